"""The job queue on its own (engine.server.jobs), with a scripted runner in place of the pipeline."""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest
import torch

from engine.errors import InputImageError
from engine.pipeline import Progress
from engine.server.jobs import STAGE_WEIGHTS, JobSettings, JobStateConflict, JobStore, UnknownJob, overall_progress

PNG = b"\x89PNG\r\n\x1a\n fake"


class ScriptedRunner:
    """Reports a few stages; with `hold`, keeps reporting fit steps until released (or cancelled)."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.hold = threading.Event()
        self.started = threading.Event()
        self.ran: list[str] = []

    def __call__(self, settings: JobSettings, folder, report) -> None:
        self.ran.append(folder.name)
        report(Progress("matting"))
        self.started.set()
        if self.fail:
            raise self.fail
        step = 0
        while self.hold.is_set():
            step += 1
            report(Progress("fit", step, 10**6, {"total": 1.5}))
            time.sleep(0.005)
        report(Progress("fit", 10, 10, {"total": 0.5}))
        report(Progress("done", 10, 10))


def wait_state(store: JobStore, job_id: str, *states: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (record := store.snapshot(job_id)[0])["state"] not in states:
        assert time.monotonic() < deadline, record
        time.sleep(0.01)
    return record


@pytest.fixture
def runner():
    return ScriptedRunner()


@pytest.fixture
def store(tmp_path, runner):
    jobs = JobStore(tmp_path / "jobs", runner)
    jobs.start()
    yield jobs
    runner.hold.clear()
    jobs.stop()


def test_progress_weights_cover_the_whole_job():
    assert sum(weight for _stage, weight in STAGE_WEIGHTS) == pytest.approx(1.0)
    assert overall_progress("matting") == 0.0
    assert overall_progress("fit", 50, 100) == pytest.approx(0.02 + 0.03 + 0.35 + 0.55 / 2)
    assert overall_progress("export") == overall_progress("turntable") == pytest.approx(0.95)
    assert overall_progress("done") == 1.0 and overall_progress("something new") is None


def test_jobs_run_one_at_a_time_in_order(store, runner):
    runner.hold.set()
    first = store.submit(PNG, JobSettings())
    second = store.submit(PNG, JobSettings(filename="b.jpg"))
    runner.started.wait(5)
    assert store.snapshot(first["id"])[0]["state"] == "running"
    assert store.queue_position(second["id"]) == 0 and store.queued_count() == 1
    runner.hold.clear()
    done = wait_state(store, second["id"], "done")
    assert runner.ran == [first["id"], second["id"]]
    assert done["progress"] == 1.0 and done["metrics"] == {"total": 0.5}
    assert (store.jobs_dir / second["id"] / "input.png").read_bytes() == PNG  # named by its bytes, not its name
    assert [j.id for j in store.jobs()] == [second["id"], first["id"]]  # newest first


def test_cancel_stops_a_running_job_and_empties_the_queue(store, runner):
    runner.hold.set()
    running = store.submit(PNG, JobSettings())
    waiting = store.submit(PNG, JobSettings())
    runner.started.wait(5)
    assert store.cancel(waiting["id"]).state == "cancelled"
    store.cancel(running["id"])
    record = wait_state(store, running["id"], "cancelled")
    assert record["error"] is None and record["stage"] == "fit"
    status = json.loads((store.jobs_dir / running["id"] / "status.json").read_text())
    assert status["state"] == "cancelled"
    assert runner.ran == [running["id"]]  # the queued one never ran


def test_errors_are_reported_with_problem_and_fix(tmp_path):
    for exc, problem in ((InputImageError("No object found.", "Use a photo with the object in it."),
                          "No object found."),
                         (RuntimeError("boom"), "Internal error: RuntimeError: boom")):
        jobs = JobStore(tmp_path / type(exc).__name__, ScriptedRunner(fail=exc))
        jobs.start()
        try:
            record = wait_state(jobs, jobs.submit(PNG, JobSettings())["id"], "failed")
        finally:
            jobs.stop()
        assert record["error"]["problem"] == problem and record["error"]["fix"]


def test_a_restart_lists_unfinished_jobs_as_interrupted_and_resume_runs_them(tmp_path, runner):
    crashed = JobStore(tmp_path / "jobs", runner)
    crashed.start()
    runner.hold.set()
    running = crashed.submit(PNG, JobSettings(preset="fast", seed=3, overrides=["fit.iterations=9"]))
    queued = crashed.submit(PNG, JobSettings())
    runner.started.wait(5)

    again = JobStore(tmp_path / "jobs", ScriptedRunner())  # the first one "died": nothing was shut down
    assert {j.id: j.state for j in again.jobs()} == {running["id"]: "interrupted", queued["id"]: "interrupted"}
    runner.hold.clear()
    crashed.stop()

    again.start()
    try:
        resumed = again.resume(running["id"])
        assert resumed.settings.overrides == ["fit.iterations=9"] and resumed.settings.seed == 3
        assert wait_state(again, running["id"], "done")["error"] is None
        with pytest.raises(JobStateConflict):
            again.resume(running["id"])
    finally:
        again.stop()


def test_stopping_the_server_interrupts_the_running_job(tmp_path, runner):
    jobs = JobStore(tmp_path / "jobs", runner)
    jobs.start()
    runner.hold.set()
    job = jobs.submit(PNG, JobSettings())
    runner.started.wait(5)
    jobs.stop()
    assert jobs.snapshot(job["id"])[0]["state"] == "interrupted"
    assert JobStore(tmp_path / "jobs", runner).get(job["id"]).state == "interrupted"


def test_files_are_only_served_from_inside_the_job_folder(store):
    job = store.submit(PNG, JobSettings())
    (store.jobs_dir / "outside.txt").write_text("no")
    assert store.file(job["id"], "input.png") is not None
    for name in ("../outside.txt", "/etc/passwd", "", ".", "a/../../outside.txt", "missing.png"):
        assert store.file(job["id"], name) is None, name
    with pytest.raises(UnknownJob):
        store.file("../" + job["id"], "input.png")


class FailsFirst(ScriptedRunner):
    """Raises `fail` on its first job only, then runs normally: the server must go on serving."""

    def __call__(self, settings, folder, report) -> None:
        fail, self.fail = self.fail, None
        if fail is not None:
            self.ran.append(folder.name)
            report(Progress("fit", 1, 10))
            raise fail
        super().__call__(settings, folder, report)


@pytest.mark.parametrize("exc, problem, fix", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU ran out of memory",
     'preset "fast" or a smaller render resolution'),
    (RuntimeError("CUDA error: out of memory"), "GPU ran out of memory", "smaller render resolution"),
    (OSError(errno.ENOSPC, "No space left on device", "/jobs/x/checkpoints/last.pt"), "The disk is full",
     "Free disk space"),
])
def test_out_of_gpu_memory_or_disk_fails_that_job_clearly_and_the_next_one_runs(tmp_path, exc, problem, fix):
    jobs = JobStore(tmp_path / "jobs", FailsFirst(fail=exc))
    jobs.start()
    try:
        failed = wait_state(jobs, jobs.submit(PNG, JobSettings())["id"], "failed")
        after = wait_state(jobs, jobs.submit(PNG, JobSettings())["id"], "done", "failed")
    finally:
        jobs.stop()
    assert problem in failed["error"]["problem"] and fix in failed["error"]["fix"], failed["error"]
    assert "bug" not in failed["error"]["fix"] and failed["message"] == failed["error"]["problem"]
    assert after["state"] == "done" and after["error"] is None  # the worker lived on


def test_a_full_disk_while_saving_job_records_does_not_kill_the_worker(tmp_path, runner, monkeypatch):
    """A job whose record cannot be saved is refused (507 in the API), not queued; a running job whose later
    record saves fail goes on (its state is right in memory); the worker lives on for the next job."""
    import engine.server.jobs as jobs_module
    from engine.errors import DiskFullError

    jobs = JobStore(tmp_path / "jobs", runner)
    jobs.start()
    try:
        def full(*_args, **_kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(jobs_module, "atomic_write_json", full)
        with pytest.raises(DiskFullError, match="disk is full"):
            jobs.submit(PNG, JobSettings())
        assert jobs.jobs() == [] and list((tmp_path / "jobs").iterdir()) == []  # nothing queued, nothing left
        monkeypatch.undo()

        runner.hold.set()
        job = jobs.submit(PNG, JobSettings())  # saved; then the disk fills while it runs
        runner.started.wait(5)
        monkeypatch.setattr(jobs_module, "atomic_write_json", full)
        runner.hold.clear()
        assert wait_state(jobs, job["id"], "done")["error"] is None
        monkeypatch.undo()
        assert wait_state(jobs, jobs.submit(PNG, JobSettings())["id"], "done")["state"] == "done"
        assert jobs.problems() == []
    finally:
        jobs.stop()


def test_the_model_cache_loads_once_per_model_device_and_dtype():
    from engine.pipeline import ModelCache

    loads = []
    cache = ModelCache(loader=lambda model, device, dtype: loads.append((model, dtype)) or object())
    cpu = torch.device("cpu")
    first = cache.get("tiny", cpu, "float32")
    assert cache.get("tiny", cpu, "float32") is first and cache.loads == 1 and cache.loaded == "tiny"
    other = cache.get("tiny", cpu, "float16")  # another dtype is another model; the old one is let go
    assert other is not first and cache.loads == 2 and cache.get("tiny", cpu, "float16") is other
    cache.clear()
    assert cache.loaded is None and cache.get("tiny", cpu, "float16") is not other and cache.loads == 3


# ---------------------------------------------------------------------- several devices (serve --gpus)

def test_gpus_values_are_parsed_and_checked_against_the_visible_gpus():
    from engine.errors import DeviceError
    from engine.server.jobs import parse_gpus

    assert parse_gpus("all", cuda_count=0) == ["cpu"]  # no CUDA: one CPU worker
    assert parse_gpus(None, cuda_count=0) == ["cpu"]
    assert parse_gpus("cpu", cuda_count=0) == parse_gpus("CPU", cuda_count=2) == ["cpu"]
    assert parse_gpus("all", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_gpus("0,1", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_gpus(" 1 , 1,cuda:0", cuda_count=2) == ["cuda:1", "cuda:0"]  # duplicates dropped, order kept
    with pytest.raises(DeviceError) as no_cuda:
        parse_gpus("0,1", cuda_count=0)
    assert "no CUDA GPU" in no_cuda.value.problem and "--gpus cpu" in no_cuda.value.fix
    assert "\n" not in str(no_cuda.value)
    with pytest.raises(DeviceError, match="GPU 2"):
        parse_gpus("0,2", cuda_count=2)
    for bad in ("", "gpu0", "0;1", "-1", "0,"):
        with pytest.raises(DeviceError, match="not understood"):
            parse_gpus(bad, cuda_count=2)


def test_serve_with_gpus_that_do_not_exist_fails_at_startup_with_one_line(tmp_path, capsys):
    from engine.cli import main

    assert main(["serve", "--gpus", "0,99", "--data-dir", str(tmp_path / "data"), "--port", "0"]) == 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --gpus 0,99 asks for GPU") and "\n" not in err and "--gpus" in err.split(".", 1)[1]
    assert not (tmp_path / "data" / "token").exists()  # nothing started


def test_serve_refuses_gpus_together_with_ray_before_starting_anything(tmp_path, capsys):
    from engine.cli import main

    assert main(["serve", "--ray", "local", "--gpus", "0", "--data-dir", str(tmp_path / "data")]) == 2
    assert "--gpus" in capsys.readouterr().err and not (tmp_path / "data").exists()
    assert main(["serve", "--workers", "2", "--max-attempts", "0", "--data-dir", str(tmp_path / "data")]) == 2
    assert "--max-attempts" in capsys.readouterr().err and not (tmp_path / "data").exists()


class TimedRunner(ScriptedRunner):
    """ScriptedRunner that also records when each job started and ended (and on which device)."""

    def __init__(self, fail=None):
        super().__init__(fail)
        self.times: dict[str, tuple[float, float]] = {}
        self.devices: dict[str, str] = {}

    def __call__(self, settings, folder, report, device=None) -> None:
        start = time.monotonic()
        self.devices[folder.name] = device
        try:
            super().__call__(settings, folder, report)
        finally:
            self.times[folder.name] = (start, time.monotonic())


def test_two_devices_run_two_jobs_at_once_and_a_third_waits_its_turn(tmp_path):
    runner = TimedRunner()
    jobs = JobStore(tmp_path / "jobs", runner, devices=["cpu", "cpu"])
    jobs.start()
    runner.hold.set()
    try:
        first, second, third = (jobs.submit(PNG, JobSettings())["id"] for _ in range(3))
        running = [wait_state(jobs, job_id, "running") for job_id in (first, second)]
        assert [r["device"] for r in running] == ["cpu", "cpu"]
        assert sorted(jobs.running_ids()) == sorted([first, second])
        assert [w["device"] for w in jobs.workers()] == ["cpu", "cpu"]
        assert {w["running"] for w in jobs.workers()} == {first, second}
        time.sleep(0.2)  # the third stays queued while both workers are busy
        assert jobs.snapshot(third)[0]["state"] == "queued" and jobs.queue_position(third) == 0
        assert jobs.snapshot(third)[0]["device"] is None
        runner.hold.clear()
        for job_id in (first, second, third):
            assert wait_state(jobs, job_id, "done")["device"] == "cpu"
    finally:
        runner.hold.clear()
        jobs.stop()
    (s1, e1), (s2, e2), (s3, _e3) = (runner.times[j] for j in (first, second, third))
    assert s1 < e2 and s2 < e1  # the first two overlapped
    assert s3 >= min(e1, e2)  # the third started only when a worker was free
    assert runner.devices == {first: "cpu", second: "cpu", third: "cpu"}  # device= handed to the runner


def test_each_worker_gets_its_own_device_and_cancel_stops_only_that_job(tmp_path):
    runner = TimedRunner()
    jobs = JobStore(tmp_path / "jobs", runner, devices=["cuda:0", "cuda:1"])  # fake: the runner only records them
    jobs.start()
    runner.hold.set()
    try:
        first, second = (jobs.submit(PNG, JobSettings())["id"] for _ in range(2))
        devices = {job_id: wait_state(jobs, job_id, "running")["device"] for job_id in (first, second)}
        assert sorted(devices.values()) == ["cuda:0", "cuda:1"]
        jobs.cancel(first)
        assert wait_state(jobs, first, "cancelled")["error"] is None
        assert jobs.snapshot(second)[0]["state"] == "running"
        runner.hold.clear()
        assert wait_state(jobs, second, "done")["device"] == devices[second]
    finally:
        runner.hold.clear()
        jobs.stop()
    assert runner.devices == devices


def test_a_job_failing_on_one_worker_does_not_stop_the_other(tmp_path):
    class CrashesFirst(TimedRunner):
        def __call__(self, settings, folder, report, device=None) -> None:
            if settings.seed == 1:
                report(Progress("fit", 1, 10))
                raise RuntimeError("worker crash")
            super().__call__(settings, folder, report, device=device)

    runner = CrashesFirst()
    jobs = JobStore(tmp_path / "jobs", runner, devices=["cpu", "cpu"])
    jobs.start()
    runner.hold.set()
    try:
        healthy = jobs.submit(PNG, JobSettings(seed=0))["id"]
        wait_state(jobs, healthy, "running")
        crashed = wait_state(jobs, jobs.submit(PNG, JobSettings(seed=1))["id"], "failed")
        assert "worker crash" in crashed["error"]["problem"]
        assert jobs.snapshot(healthy)[0]["state"] == "running"  # the other worker goes on
        after = jobs.submit(PNG, JobSettings(seed=2))["id"]  # the crashed job's worker takes the next one
        assert wait_state(jobs, after, "running")["state"] == "running"
        runner.hold.clear()
        assert wait_state(jobs, healthy, "done")["error"] is None
        assert wait_state(jobs, after, "done")["error"] is None
    finally:
        runner.hold.clear()
        jobs.stop()


def test_stopping_interrupts_the_jobs_of_every_worker(tmp_path):
    runner = TimedRunner()
    jobs = JobStore(tmp_path / "jobs", runner, devices=["cpu", "cpu"])
    jobs.start()
    runner.hold.set()
    ids = [jobs.submit(PNG, JobSettings())["id"] for _ in range(2)]
    for job_id in ids:
        wait_state(jobs, job_id, "running")
    jobs.stop(timeout=10)
    assert [jobs.snapshot(job_id)[0]["state"] for job_id in ids] == ["interrupted", "interrupted"]
    runner.hold.clear()


def test_gpus_all_on_four_gpus_gives_one_model_per_gpu_and_never_two_jobs_on_one(tmp_path, monkeypatch):
    """`serve --gpus all` on a (faked) 4-GPU machine through the real Reconstructor: the pipeline and the
    model loader are stand-ins that record which device and which cached model each job got."""
    import engine.pipeline as pipeline
    from engine.pipeline import ModelCache
    from engine.server.jobs import Reconstructor, ServerSettings, parse_gpus

    devices = parse_gpus("all", cuda_count=4)
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    lock, busy, peak, seen = threading.Lock(), set(), [0], []

    def prior(cache_dir=None, models=None, check_cancel=None):
        return models.get("tiny", "fake-device", "float32")  # loads once per cache, then reuses it

    def reconstruct(image, folder, cfg, device=None, prior=None, report=None, resume=None, check_cancel=None):
        with lock:
            assert device not in busy, f"two jobs on {device} at once"
            busy.add(device)
            peak[0] = max(peak[0], len(busy))
            seen.append((device, id(prior)))
        time.sleep(0.15)
        with lock:
            busy.discard(device)

    monkeypatch.setattr(pipeline, "reconstruct", reconstruct)
    monkeypatch.setattr(pipeline, "stable_diffusion_prior", prior)
    reconstructor = Reconstructor(ServerSettings(gpus="all"))
    reconstructor._ModelCache = lambda: ModelCache(loader=lambda model, device, dtype: object())
    monkeypatch.setattr(reconstructor, "check", lambda settings, folder: None)  # the fake PNG is not an image
    monkeypatch.setattr(reconstructor, "config", lambda settings: None)
    jobs = JobStore(tmp_path / "jobs", reconstructor, devices=devices)
    jobs.start()
    try:
        ids = [jobs.submit(PNG, JobSettings())["id"] for _ in range(8)]
        records = [wait_state(jobs, job_id, "done", "failed") for job_id in ids]
    finally:
        jobs.stop()
    assert [r["state"] for r in records] == ["done"] * 8, records
    assert peak[0] == 4 and {r["device"] for r in records} == set(devices)  # every GPU busy at once
    caches = reconstructor.caches
    assert sorted(caches) == [(d, i) for i, d in enumerate(devices)] and all(c.loads == 1 for c in caches.values())
    models_by_device = {}
    for device, model in seen:
        models_by_device.setdefault(device, set()).add(model)
    assert all(len(m) == 1 for m in models_by_device.values())  # each GPU kept its one model between its jobs
    assert len({next(iter(m)) for m in models_by_device.values()}) == 4  # and no two GPUs shared one
    # Two workers listed on one device (the plumbing run on one GPU) each keep a model of their own.
    assert reconstructor.models_for("cuda:0", 0) is not reconstructor.models_for("cuda:0", 5)
