"""`realfusion serve --ray local --workers 2`: the same HTTP API, the jobs run on a pool of Ray actors.

One server process (real HTTP on 127.0.0.1, as the add-on sees it) starts a local Ray cluster with two
CPU workers and the tiny Stable Diffusion; it is shared by every test here because Ray starts slowly.
A job runs to done with its files; a job whose worker process is killed mid-fit goes on from its
checkpoint on a new worker; a cancel stops a running job on its worker, keeping its checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import pytest

from test_server import LONG_FIT, Server, job_request

pytest.importorskip("ray", reason="the ray extra (scripts/setup installs it)")


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_sd_dir):
    root = tmp_path_factory.mktemp("ray-server")
    srv = Server(root / "jobs", tiny_sd_dir, tmp_path_factory.mktemp("embeddings"), root / "server.log",
                 extra=("--ray", "local", "--workers", "2"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def photo_b64(tmp_path_factory) -> str:
    import base64

    from synthetic_images import rgba_disc

    return base64.b64encode(rgba_disc(tmp_path_factory.mktemp("photo") / "disc.png").read_bytes()).decode()


KILL_OVERRIDES = ["fit.iterations=10", "fit.checkpoint_every=2", "fit.preview_every=2"]


class KillAfterCheckpoint(threading.Thread):
    """Kills the process of the Ray worker running `job_id` once its fit is past its checkpoint at step 2."""

    def __init__(self, server, job_id):
        super().__init__(daemon=True)
        self.server, self.job_id = server, job_id
        self.killed = None  # (the worker as /health showed it, the time of the kill)
        self.early_preview_mtime = None

    def run(self):
        folder = self.server.jobs_dir / self.job_id
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, job = self.server.call("GET", f"/jobs/{self.job_id}")
            if job["state"] != "running" and job["state"] != "queued":
                return  # finished before it could be killed: the test says so
            if job["stage"] == "fit" and job["step"] >= 3 and (folder / "checkpoints" / "last.pt").is_file():
                workers = self.server.call("GET", "/health")[1]["workers"]
                worker = next(w for w in workers if w["running"] == self.job_id)
                self.early_preview_mtime = (folder / "previews" / "step_000002.png").stat().st_mtime
                os.kill(worker["pid"], signal.SIGKILL)
                self.killed = (worker, time.time())
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def submitted(ray_server, photo_b64) -> dict:
    """Two jobs submitted at once, as soon as the server listens: one runs plainly, the other's worker gets
    killed; on the two workers they run side by side (the tests stay short)."""
    ids = {}
    for name, overrides in (("plain", ()), ("killed", KILL_OVERRIDES)):
        status, job = ray_server.call("POST", "/jobs", job_request(photo_b64, overrides))
        assert status == 201, job
        ids[name] = job["id"]
    ids["killer"] = KillAfterCheckpoint(ray_server, ids["killed"])
    ids["killer"].start()
    return ids


def ready_workers(server, timeout=60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        status, health = server.call("GET", "/health")
        assert status == 200, health
        if all(w["ready"] for w in health["workers"]):
            return health["workers"]
        if time.monotonic() > deadline:
            pytest.fail(f"the Ray workers did not start: {health}\n{server.log_tail()}")
        time.sleep(0.3)


def test_health_shows_each_ray_worker_with_its_device_and_memory(ray_server, submitted):
    workers = ready_workers(ray_server)
    assert [w["device"] for w in workers] == ["ray:0", "ray:1"]
    assert all(w["runs_on"] == "cpu" and w["gpu"] is None and w["gpu_memory"] is None for w in workers)
    assert all(w["memory_bytes"] > 10 * 2**20 and w["host"] for w in workers)  # as each actor reports it
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and ray_server.proc.pid not in pids  # two processes of their own
    _, health = ray_server.call("GET", "/health")
    assert health["pool"] == "ray" and health["device"] == "cpu" and health["ok"] is True


def test_a_job_runs_to_done_on_a_ray_worker_and_serves_its_files(ray_server, submitted):
    job = ray_server.wait(submitted["plain"], timeout=60)
    assert job["state"] == "done" and job["progress"] == 1.0, f"{job}\n{ray_server.log_tail()}"
    assert job["device"] in ("ray:0", "ray:1") and set(job["metrics"]) >= {"total", "sds"}
    assert set(job["files"]) >= {"input.png", "reference.png", "preview.png", "turntable.png", "field.pt"}
    status, headers, body = ray_server.raw_get(f"/jobs/{job['id']}/files/status.json")
    assert status == 200 and json.loads(body)["state"] == "done" and json.loads(body)["steps"] == 6
    assert ray_server.raw_get(job["preview"])[0] == 200
    worker = next(w for w in ray_server.call("GET", "/health")[1]["workers"] if w["device"] == job["device"])
    assert worker["model_loaded"] == str(ray_server.model) and worker["model_loads"] == 1  # kept in that actor


def test_a_job_whose_ray_worker_is_killed_goes_on_from_its_checkpoint_on_a_new_one(ray_server, submitted):
    killer = submitted["killer"]
    killer.join(120)
    assert killer.killed is not None, "the job finished before its worker could be killed"
    worker, killed_at = killer.killed
    job = {"id": submitted["killed"]}
    folder = ray_server.jobs_dir / job["id"]
    job = ray_server.wait(job["id"], timeout=60)
    assert job["state"] == "done" and job["error"] is None, f"{job}\n{ray_server.log_tail()}"
    assert json.loads((folder / "status.json").read_text())["steps"] == 10
    early_preview = folder / "previews" / "step_000002.png"  # written with the checkpoint at step 2
    assert early_preview.stat().st_mtime == killer.early_preview_mtime  # went on from the checkpoint, not step 0
    assert (folder / "previews" / "step_000010.png").stat().st_mtime > killed_at
    replaced = next(w for w in ray_server.call("GET", "/health")[1]["workers"] if w["device"] == worker["device"])
    assert replaced["replaced"] == 1 and replaced["pid"] != worker["pid"] and replaced["last_death"]
    assert "died" in ray_server.log_tail()


def test_a_job_failing_on_its_worker_for_its_own_reason_fails_with_problem_and_fix(ray_server, photo_b64, tmp_path):
    missing = str(tmp_path / "no-such-model")  # found out on the worker, when it loads the model
    lost_before = sum(w["replaced"] for w in ray_server.call("GET", "/health")[1]["workers"])
    status, job = ray_server.call("POST", "/jobs", job_request(photo_b64, model=missing))
    assert status == 201, job
    job = ray_server.wait(job["id"], timeout=30)
    assert job["state"] == "failed" and missing in job["error"]["problem"] and job["error"]["fix"], job
    assert sum(w["replaced"] for w in ray_server.call("GET", "/health")[1]["workers"]) == lost_before  # not retried


def test_cancel_stops_a_job_on_its_ray_worker_keeping_its_checkpoint(ray_server, photo_b64):
    status, job = ray_server.call("POST", "/jobs", job_request(photo_b64, LONG_FIT))
    assert status == 201, job
    checkpoint = ray_server.jobs_dir / job["id"] / "checkpoints" / "last.pt"
    ray_server.wait(job["id"], lambda j: j["stage"] == "fit" and j["step"] >= 3 or j["state"] != "running")
    assert checkpoint.is_file()
    cancelled_at = time.monotonic()
    assert ray_server.call("DELETE", f"/jobs/{job['id']}")[0] == 200
    job = ray_server.wait(job["id"], timeout=30)
    assert job["state"] == "cancelled" and job["error"] is None, job
    assert time.monotonic() - cancelled_at < 10  # the actor stopped itself (no kill after the grace period)
    assert json.loads((checkpoint.parents[1] / "status.json").read_text())["state"] == "cancelled"
    workers = ray_server.call("GET", "/health")[1]["workers"]
    assert all(w["running"] is None for w in workers)
