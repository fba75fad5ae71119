"""The job queue behind `realfusion serve`: one worker thread per device, every job a folder.

A job is JOBS_DIR/<id>/: the upload (input.png or input.jpg), `job.json` (the server's
record: its settings and last state) and whatever `engine.pipeline.reconstruct` writes
there (status.json, reference.png, preview.png, turntable.png, field.pt, checkpoints/...).
Nothing here knows about HTTP, so the queue can be driven and tested directly.

Jobs start in submission order; each device (`--gpus`: "cuda:0", "cuda:1", ... or "cpu") has its
own worker thread, which takes the next queued job when its job ends. Cancelling sets a flag that
the pipeline's progress callback checks, so a running fit stops at its next step with its
checkpoint kept. A server that stops (or dies) leaves unfinished jobs "interrupted"; they
are listed again on the next start and `resume` queues them to go on from their checkpoint.
With `serve --ray`, the runner is engine/server/ray_pool.py's RayJobRunner: the same worker threads,
each driving a Ray actor that does the work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import deque
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..config import PriorConfig
from ..errors import DeviceError, DiskFullError, EngineError
from ..outputs import OutputDir, atomic_write_bytes, atomic_write_json, is_disk_full, remove_stale_temporaries
from ..validation import checked_config

log = logging.getLogger("realfusion.server")

JOB_FILE = "job.json"
LOCK_FILE = ".server.lock"  # held (flock) by the one server using a data folder

# Share of the whole job each stage stands for, in the order they run; "progress" is the
# weights of the finished stages plus the running stage's weight times its step/total.
STAGE_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("matting", 0.02),
    ("prior", 0.03),
    ("textual_inversion", 0.35),
    ("fit", 0.55),
    ("turntable", 0.05),  # turntable pictures and the export (mesh.glb, camera.json) together
)
STAGE_ALIASES = {"export": "turntable", "mesh": "turntable"}
STAGE_LABELS = {
    "matting": "Cutting out the object",
    "prior": "Loading the diffusion model",
    "textual_inversion": "Learning the object's token",
    "fit": "Fitting the 3D field",
    "turntable": "Rendering the turntable",
    "export": "Exporting the mesh",
    "mesh": "Exporting the mesh",
    "done": "Done",
}

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "done", "failed", "cancelled", "interrupted")
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)  # nothing more will happen without a resume
RESUMABLE = (FAILED, CANCELLED, INTERRUPTED)

# The results a client may want, as listed in a job's "files" (other files in the folder can be fetched too).
RESULT_FILES = ("reference.png", "preview.png", "turntable.png", "mesh.glb", "camera.json", "export.json",
                "field.pt")
IMAGE_EXTENSIONS = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpg"}


def overall_progress(stage: str, step: int = 0, total: int = 0) -> float | None:
    """0..1 for the whole job from the running stage and its step; None for a stage not in STAGE_WEIGHTS."""
    if stage == "done":
        return 1.0
    stage = STAGE_ALIASES.get(stage, stage)
    finished = 0.0
    for name, weight in STAGE_WEIGHTS:
        if name == stage:
            fraction = min(step / total, 1.0) if total else 0.0
            return round(finished + weight * fraction, 4)
        finished += weight
    return None


def parse_gpus(value: str | None, cuda_count: int | None = None) -> list[str]:
    """The worker devices for `--gpus`: "all" (every visible CUDA GPU, or one CPU worker when there is
    none), "cpu", or GPU indices "0,1". `cuda_count`: GPUs visible (None: ask torch). Raises DeviceError."""
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    text = "all" if value is None else value.strip().lower()
    if text == "all":
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    if text == "cpu":
        return ["cpu"]
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise DeviceError(f"--gpus {value!r} is not understood.",
                              "Use --gpus all, --gpus cpu, or GPU indices such as --gpus 0,1.")
        if int(part) not in indices:
            indices.append(int(part))
    missing = [i for i in indices if i >= cuda_count]
    if missing:
        seen = (f"PyTorch sees {cuda_count} CUDA GPU(s) (indices 0-{cuda_count - 1})" if cuda_count
                else "PyTorch sees no CUDA GPU on this machine")
        raise DeviceError(f"--gpus {value} asks for GPU {', '.join(map(str, missing))}, but {seen}.",
                          "Pick indices from `nvidia-smi -L` (check CUDA_VISIBLE_DEVICES), use --gpus all, "
                          "or --gpus cpu (much slower).")
    return [f"cuda:{i}" for i in indices]


class JobCancelled(BaseException):
    """Raised from the progress callback or the cancel check to stop a running job. A BaseException (like
    KeyboardInterrupt), so no `except Exception` on the way up can swallow it."""


class UnknownJob(EngineError):
    def __init__(self, job_id: str):
        super().__init__(f"There is no job {job_id!r} on this server.", "List the jobs with GET /jobs.")


class JobStateConflict(EngineError):
    """The job is not in a state that allows what was asked (e.g. resuming a finished job)."""


class DataDirInUse(EngineError):
    """Another `realfusion serve` holds the data folder's lock."""


class DataDirLock:
    """An exclusive flock on DATA_DIR/.server.lock for as long as this server runs.

    Taken before anything in the folder is read or changed, so a second server on the same folder
    refuses at once and leaves the first one's jobs alone. The kernel drops the lock when the process
    dies (even by kill -9), so a stale lock file never blocks a restart."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise DataDirInUse(f"Another realfusion server (pid {holder}) is already using the data folder "
                               f"{self.path.parent}.",
                               "Use that server (the Blender add-on can connect to it), stop it first, or start "
                               "this one with another --data-dir.") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


@dataclass
class ServerSettings:
    model: str | None = None  # default Stable Diffusion hub id or folder; None: the preset's
    device: str = "auto"  # auto | cpu | cuda | cuda:N: the one worker's device when `gpus` is not given
    gpus: str | None = None  # --gpus: all | cpu | 0,1 -> one worker per device (see parse_gpus); wins over device
    cache_dir: Path | None = None  # learned embeddings; None: engine.pipeline.default_cache_dir()
    host: str = "127.0.0.1"
    max_upload_bytes: int = 50 * 1024 * 1024  # the photo's bytes, decoded
    max_pixels: int = 64_000_000  # the photo's width x height, read from its header
    header_timeout_s: float = 10.0  # a connection must send a whole request header within this, or is closed
    # --ray: the workers are Ray actors (engine/server/ray_pool.py) instead of threads on this machine's devices
    ray: str | None = None  # None: local workers; "local": start a Ray cluster here; else a cluster's address
    workers: int | None = None  # Ray workers (None: one per GPU of the cluster, or one CPU worker)
    gpus_per_worker: float = 1.0  # below 1 puts several Ray workers on one GPU
    max_attempts: int = 3  # runs of a job whose Ray worker keeps dying before it fails
    worker_start_timeout_s: float = 300.0  # how long a job waits for its Ray worker to start

    @property
    def default_model(self) -> str:
        return self.model or PriorConfig().model


@dataclass
class JobSettings:
    """What the client asked for; saved in job.json so a resume runs the same job."""

    filename: str = "input.png"
    preset: str = "standard"
    method: str = "realfusion"
    seed: int = 0
    model: str | None = None
    overrides: list[str] = field(default_factory=list)
    input: str = "input.png"  # the upload's name inside the job folder
    initializer: str | None = None  # the word naming the object (textual_inversion.initializer); None: the preset's


@dataclass
class Job:
    id: str
    settings: JobSettings
    state: str = QUEUED
    stage: str = ""
    step: int = 0
    total: int = 0
    progress: float = 0.0
    message: str = ""
    error: dict | None = None  # {"problem", "fix"}
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    metrics: dict = field(default_factory=dict)  # the last fit step's losses
    device: str | None = None  # the worker's device ("cuda:1", "cpu") while running, and the last one after
    cancel_requested: bool = False  # saved, so a job cancelled while running stays cancelled after a restart

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict) -> "Job":
        data = dict(data)
        settings = JobSettings(**data.pop("settings"))
        known = set(cls.__dataclass_fields__)
        return cls(settings=settings, **{k: v for k, v in data.items() if k in known})


def default_jobs_dir() -> Path:
    """The server's data folder (jobs and the token file): $REALFUSION_DATA, $REALFUSION_JOBS or
    ~/.local/share/realfusion/jobs. The Blender add-on computes the same path (engine_process.default_data_dir)."""
    root = os.environ.get("REALFUSION_DATA") or os.environ.get("REALFUSION_JOBS") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "realfusion", "jobs")
    return Path(root)


default_data_dir = default_jobs_dir


def process_memory_bytes() -> int | None:
    """This process's resident memory in bytes (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def resource_error(exc: BaseException) -> dict | None:
    """{"problem", "fix"} for a job that ran out of GPU or CPU memory or disk space; None for anything else."""
    if _is_cpu_oom(exc):
        return {"problem": f"The computer ran out of memory during this job ({str(exc).splitlines()[0][:200]}).",
                "fix": "Close other programs, then resume the job, or submit it again with preset \"fast\" or "
                       "smaller sizes (e.g. overrides render.random_resolution=64 textual_inversion.batch_size=1); "
                       "the server runs on."}
    if _is_cuda_oom(exc):
        return {"problem": f"The GPU ran out of memory during this job ({str(exc).splitlines()[0][:200]}).",
                "fix": "Close other programs using the GPU (Blender's Cycles/Eevee viewport too), then resume the "
                       "job, or submit it again with preset \"fast\" or a smaller render resolution "
                       "(e.g. overrides render.random_resolution=64); the server runs on."}
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        where = f" writing {exc.filename}" if exc.filename else ""
        return {"problem": f"The disk is full{where}.",
                "fix": "Free disk space (old jobs in the server's data folder can be deleted), then resume the job."}
    return None


def _is_cpu_oom(exc: BaseException) -> bool:
    """MemoryError, or torch's CPU allocator failing ("DefaultCPUAllocator: can't allocate memory")."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "defaultcpuallocator" in text))


def _is_cuda_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


Report = Callable[[object], None]  # takes engine.pipeline.Progress


class Reconstructor:
    """What a job runs: `engine.pipeline.reconstruct` with the server's model, device and cache.

    `prior_factory(settings)` returns the `prior` handed to reconstruct; the default is the
    real Stable Diffusion prior (tests inject a small one).
    """

    def __init__(self, settings: ServerSettings, prior_factory: Callable | None = None):
        from ..pipeline import ModelCache

        self.settings = settings
        self._ModelCache = ModelCache
        # (device, worker) -> the Stable Diffusion model that worker keeps on its device between jobs: one per GPU
        # with one worker per GPU, and two workers listed on one device never share (nor swap) one model
        self._caches: dict[tuple, ModelCache] = {}
        self._caches_lock = threading.Lock()
        self.prior_factory = prior_factory

    def devices(self) -> list[str]:
        """The worker devices: --gpus when given, else the one --device (auto: cuda when there is one)."""
        if self.settings.gpus is not None:
            return parse_gpus(self.settings.gpus)
        from ..pipeline import resolve_device

        return [str(resolve_device(self.settings.device))]

    def models_for(self, device: str | None, worker: int | None = None):
        """The model cache of one worker on its device (each worker keeps its own model on its own GPU)."""
        key = (str(device or self.settings.device), worker)
        with self._caches_lock:
            if key not in self._caches:
                self._caches[key] = self._ModelCache()
            return self._caches[key]

    @property
    def caches(self) -> dict:
        with self._caches_lock:
            return dict(self._caches)

    def config(self, job: JobSettings):
        """The job's whole config, validated (engine.validation): InvalidSettings names what is wrong."""
        return checked_config(job.preset, job.overrides, seed=job.seed, method=job.method, model=job.model,
                              initializer=job.initializer)

    def check(self, job: JobSettings, folder: Path) -> None:
        """Raise an EngineError now for what would make the job fail at all: bad settings, unreadable image."""
        from ..matting import load_image

        load_image(folder / job.input, self.config(job).matting)

    def __call__(self, job: JobSettings, folder: Path, report: Report, device: str | None = None,
                 check_cancel: Callable[[], None] | None = None, worker: int | None = None) -> None:
        import torch

        from ..pipeline import reconstruct, stable_diffusion_prior

        device = device or self.settings.device
        models = self.models_for(device, worker)
        on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
        if on_gpu and ":" in str(device):
            torch.cuda.set_device(torch.device(device))  # this worker thread's default GPU is its own
        prior = (self.prior_factory(self.settings) if self.prior_factory is not None
                 else stable_diffusion_prior(cache_dir=self.settings.cache_dir, models=models,
                                             check_cancel=check_cancel))
        try:
            with cancellable_forwards(check_cancel):
                reconstruct(folder / job.input, folder, self.config(job), device=device,
                            prior=prior, report=report, resume=True, check_cancel=check_cancel)
        except BaseException as exc:
            if _is_cuda_oom(exc):
                models.clear()  # give everything back; the next job on this GPU loads the model again
            raise
        finally:
            if on_gpu:
                torch.cuda.empty_cache()  # give the model's memory back between jobs (Blender shares the GPU)


_forward_check = threading.local()  # .check: the cancel check of the job this worker thread runs, or None
_forward_hook_lock = threading.Lock()
_forward_hook_installed = False


@contextlib.contextmanager
def cancellable_forwards(check_cancel: Callable[[], None] | None):
    """While active, every torch module call on this thread first runs `check_cancel` (which raises to stop).

    One UNet step of textual inversion or SDS at 512 px takes minutes on a CPU, far longer than any loop
    of the pipeline: checking at every module call makes a cancel take effect within a fraction of a
    second whatever runs. One global pre-forward hook serves every worker; it reads its thread's check,
    so it costs one attribute lookup per module call and touches no other thread's work."""
    global _forward_hook_installed
    if check_cancel is None:
        yield
        return
    import torch

    with _forward_hook_lock:
        if not _forward_hook_installed:
            torch.nn.modules.module.register_module_forward_pre_hook(_check_before_forward)
            _forward_hook_installed = True
    _forward_check.check = check_cancel
    try:
        yield
    finally:
        _forward_check.check = None


def _check_before_forward(_module, _inputs):
    check = getattr(_forward_check, "check", None)
    if check is not None:
        check()


class _Worker:
    """One worker thread and its device; what it runs now and how a stop of that job ends."""

    def __init__(self, index: int, device: str | None):
        self.index, self.device = index, device
        self.running: Job | None = None
        self.cancel = threading.Event()
        self.stop_state = CANCELLED  # what a stopped running job becomes: cancelled, or interrupted at shutdown
        self.thread: threading.Thread | None = None
        self.restarts = 0  # times its thread died and a new one took over
        self.last_death: str | None = None  # "RuntimeError: ..." of the last death

    def check_cancel(self) -> None:
        """Raise JobCancelled when this worker's job was asked to stop (the pipeline calls this in its loops)."""
        if self.cancel.is_set():
            raise JobCancelled()


class JobStore:
    """Every job of one jobs folder: the FIFO queue, one worker thread per device and the records on disk.

    `devices`: one worker per entry ("cuda:0", "cuda:1", "cpu"; the same device may be listed twice);
    each hands its device to the runner as `device=` (when the runner takes that argument). None: one
    worker, and the runner picks its own device."""

    def __init__(self, jobs_dir: Path, runner: Callable[..., None], *,
                 default_model: str | None = None, devices: list[str | None] | None = None):
        self.jobs_dir = Path(jobs_dir)
        try:
            OutputDir(self.jobs_dir)  # created and checked writable, with the engine's clear error if not
        except DiskFullError as exc:  # start anyway: each write that fails answers 507, and space may come back
            log.warning("%s %s", exc.problem, exc.fix)
        self.runner = runner
        self.default_model = default_model
        devices = list(devices) if devices is not None else [None]
        if not devices:
            raise DeviceError("The job server was given no device to run jobs on.",
                              "Start it with --gpus all, --gpus cpu or GPU indices such as --gpus 0,1.")
        self._workers = [_Worker(i, device) for i, device in enumerate(devices)]
        self._runner_takes_device = _takes(runner, "device")
        self._runner_takes_cancel = _takes(runner, "check_cancel")
        self._runner_takes_worker = _takes(runner, "worker")
        self._runner_takes_note = _takes(runner, "note")
        self._resume_floor: dict[str, float] = {}  # job id -> its progress when resumed (not shown going back)
        self._lock = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._stopping = False
        self._versions: dict[str, int] = {}
        self._load()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stopping = False
        for worker in self._workers:
            if worker.thread is None:
                self._start_thread(worker)

    def _start_thread(self, worker: _Worker) -> None:
        name = f"realfusion-jobs-{worker.index}" + (f"-{worker.device}" if worker.device else "")
        worker.thread = threading.Thread(target=self._work, args=(worker,), name=name, daemon=True)
        worker.thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the workers; running jobs stop at once (see cancellable_forwards) and are left "interrupted",
        but those a client cancelled stay "cancelled"."""
        with self._lock:
            self._stopping = True
            for worker in self._workers:
                if worker.running is not None:
                    if not worker.running.cancel_requested:
                        worker.stop_state = INTERRUPTED
                    worker.cancel.set()
            self._lock.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                worker.thread = None

    @property
    def stopping(self) -> bool:
        return self._stopping

    def problems(self) -> list[str]:
        """What /health reports as not ok: worker threads that died (and were replaced) or are not running."""
        found = []
        with self._lock:
            for w in self._workers:
                name = f"worker {w.index}" + (f" ({w.device})" if w.device else "")
                if w.thread is not None and not w.thread.is_alive() and not self._stopping:
                    found.append(f"{name} is not running")
                if w.restarts:
                    found.append(f"{name} died {w.restarts} time(s) and was restarted; last: {w.last_death}")
        return found

    # ------------------------------------------------------------------ the API's verbs

    def submit(self, image: bytes, settings: JobSettings) -> dict:
        """Save the upload as <id>/input.<ext>, let the runner check it (and the settings), queue the job.

        Returns the job's record as queued (the worker may have started it by the time the caller looks)."""
        job_id = self._new_id()
        folder = self.jobs_dir / job_id
        settings.input = f"input.{_image_extension(image, settings.filename)}"
        settings.model = settings.model or self.default_model
        check = getattr(self.runner, "check", None)
        job = Job(job_id, settings, message="Waiting for its turn")
        try:
            atomic_write_bytes(folder / settings.input, image)
            if check is not None:
                check(settings, folder)
            # The record is on disk before the job is queued: a job the server cannot save is never run.
            atomic_write_json(folder / JOB_FILE, dataclasses.replace(job, state=QUEUED).to_record())
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if is_disk_full(exc):
                raise _disk_full(exc) from exc  # 507, with the server's fix
            raise
        with self._lock:
            job.created = job.updated = time.time()  # under the lock: "created" order is the queue's order
            self._jobs[job_id] = job
            self._enqueue(job)
            record = job.to_record()
        log.info("job %s queued (%s, preset %s)", job_id, settings.filename, settings.preset)
        return record

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    def jobs(self) -> list[Job]:
        """Newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: (j.created, j.id), reverse=True)

    def version(self, job_id: str) -> int:
        """Bumped on every change of the job: a cheap "has it changed?" without copying the record."""
        self.get(job_id)
        return self._versions.get(job_id, 0)

    def snapshot(self, job_id: str) -> tuple[dict, int]:
        """The job as plain data and its version (bumped on every change), read consistently."""
        with self._lock:
            job = self.get(job_id)
            return job.to_record(), self._versions.get(job_id, 0)

    def queue_position(self, job_id: str) -> int | None:
        """0 for the next job to run; None when the job is not waiting."""
        with self._lock:
            try:
                return self._queue.index(job_id)
            except ValueError:
                return None

    def queued_count(self) -> int:
        return len(self._queue)

    def running_id(self) -> str | None:
        """The id of a running job (the first worker's that has one), or None."""
        ids = self.running_ids()
        return ids[0] if ids else None

    def running_ids(self) -> list[str]:
        with self._lock:
            return [w.running.id for w in self._workers if w.running is not None]

    def workers(self) -> list[dict]:
        """[{"device", "running"}] per worker thread, in order."""
        with self._lock:
            return [{"device": w.device, "running": w.running.id if w.running else None} for w in self._workers]

    @property
    def devices(self) -> list[str | None]:
        return [w.device for w in self._workers]

    def cancel(self, job_id: str) -> Job:
        """A queued job leaves the queue; a running one stops at its next step. Finished jobs are left as they are."""
        with self._lock:
            job = self.get(job_id)
            if job.state == QUEUED:
                self._queue.remove(job_id)
                self._finish(job, CANCELLED, "Cancelled before it started")
                self._write_folder_status(job)
            elif job.state == RUNNING:
                worker = next((w for w in self._workers if w.running is job), None)
                if worker is not None:
                    worker.stop_state = CANCELLED
                    worker.cancel.set()
                    job.cancel_requested = True
                    self._touch(job, message="Cancelling")
                    self._persist(job)  # a restart before it stops finds it cancelled, not interrupted
        return job

    def resume(self, job_id: str) -> Job:
        """Queue an interrupted, failed or cancelled job again; it goes on from its last checkpoint."""
        with self._lock:
            job = self.get(job_id)
            if job.state not in RESUMABLE:
                raise JobStateConflict(f"Job {job_id} is {job.state}; only {', '.join(RESUMABLE)} jobs can be resumed.",
                                       "Wait for it to finish, or submit a new job with POST /jobs.")
            queued = dataclasses.replace(job, state=QUEUED, error=None, cancel_requested=False, device=None)
            self._persist(queued, strict=True)  # not queued unless saved as queued: DiskFullError -> 507
            job.error, job.cancel_requested = None, False
            self._resume_floor[job.id] = job.progress
            self._enqueue(job, "Queued again; it goes on from its last checkpoint")
        log.info("job %s resumed", job_id)
        return job

    def file(self, job_id: str, name: str) -> Path | None:
        """The file `name` inside the job's folder, or None: nothing outside the folder, nothing missing."""
        folder = (self.jobs_dir / self.get(job_id).id).resolve()
        if not name or "\x00" in name:
            return None
        path = (folder / name).resolve()
        if not path.is_relative_to(folder) or path == folder or not path.is_file():
            return None
        return path

    def present_files(self, job_id: str) -> list[str]:
        job = self.get(job_id)
        folder = self.jobs_dir / job.id
        return [name for name in (job.settings.input, *RESULT_FILES) if (folder / name).is_file()]

    # ------------------------------------------------------------------ the worker

    def _work(self, worker: _Worker) -> None:
        """The worker thread. Whatever goes wrong, the job in hand ends failed, and should this thread die
        anyway a new one takes its place (and /health says so)."""
        try:
            self._work_loop(worker)
        except BaseException as exc:  # noqa: BLE001 - the last line of defence: log, count, replace the thread
            log.exception("worker %s died", worker.index)
            with self._lock:
                worker.restarts += 1
                worker.last_death = f"{type(exc).__name__}: {exc}"[:300]
                job, worker.running = worker.running, None
                if job is not None and job.state == RUNNING:
                    self._finish(job, *self._internal_error(job, exc))
                if not self._stopping:
                    self._start_thread(worker)

    def _work_loop(self, worker: _Worker) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._jobs[self._queue.popleft()]
                worker.running = job
                worker.cancel.clear()
                worker.stop_state = CANCELLED
                if job.id not in self._resume_floor:  # a resumed job keeps its stage and step until it passes them
                    job.stage, job.step, job.total, job.progress = "", 0, 0, 0.0
                self._touch(job, state=RUNNING, device=worker.device, message="Starting")
                self._persist(job)
            log.info("job %s started%s", job.id, f" on {worker.device}" if worker.device else "")
            try:
                self._run(job, worker)
            except BaseException as exc:  # never leave the job "running" nor the worker's slot taken
                log.exception("job %s: worker %s failed", job.id, worker.index)
                with self._lock:
                    if worker.running is job:
                        worker.running = None
                        self._finish(job, *self._internal_error(job, exc))
                if not isinstance(exc, Exception):
                    raise

    def _run(self, job: Job, worker: _Worker) -> None:
        def report(progress) -> None:
            if worker.cancel.is_set():
                raise JobCancelled()
            self._on_progress(job, progress)

        state, message, error = DONE, "Done", None
        extra = {}
        if self._runner_takes_device:
            extra["device"] = worker.device
        if self._runner_takes_cancel:
            extra["check_cancel"] = worker.check_cancel
        if self._runner_takes_worker:
            extra["worker"] = worker.index
        if self._runner_takes_note:
            extra["note"] = lambda text: self._note(job, text)
        try:
            self.runner(job.settings, self.jobs_dir / job.id, report, **extra)
        except JobCancelled:
            state = worker.stop_state
            message = ("Cancelled; its last checkpoint is kept" if state == CANCELLED
                       else "Stopped with the server; resume it to go on from its last checkpoint")
        except EngineError as exc:
            state, message, error = FAILED, str(exc), {"problem": exc.problem, "fix": exc.fix}
        except (Exception, MemoryError) as exc:
            error = resource_error(exc)
            if error is not None:  # out of GPU memory or disk: this job fails, the server runs on
                log.warning("job %s: %s", job.id, error["problem"])
                state, message = FAILED, error["problem"]
            else:
                state, message, error = self._internal_error(job, exc)
        with self._lock:
            worker.running = None
            self._resume_floor.pop(job.id, None)
            self._finish(job, state, message, error)
            if state in (CANCELLED, INTERRUPTED):
                self._write_folder_status(job)  # the pipeline wrote "failed"; say what really happened
        log.info("job %s %s%s", job.id, state, f": {message}" if state == FAILED else "")

    @staticmethod
    def _internal_error(job: Job, exc: Exception) -> tuple[str, str, dict]:
        """A bug: keep the traceback in the log, tell the client what happened."""
        log.error("job %s: internal error", job.id, exc_info=exc)
        problem = f"Internal error: {type(exc).__name__}: {exc}"
        return FAILED, problem, {"problem": problem, "fix": "This is a bug in the engine; the server log has the "
                                                            "traceback. Resume the job to try again."}

    def _on_progress(self, job: Job, progress) -> None:
        with self._lock:
            overall = overall_progress(progress.stage, progress.step, progress.total)
            label = STAGE_LABELS.get(progress.stage, progress.stage)
            label = f"{label} ({progress.step}/{progress.total})" if progress.total else label
            floor = self._resume_floor.get(job.id)
            if floor is not None and overall is not None and overall < floor:
                # A resumed job runs its quick early stages again (matting, the cached token) before the fit goes
                # on from its checkpoint: keep showing where it was instead of sending it back to step 0.
                self._touch(job, message=f"Resuming: {label}")
                return
            self._resume_floor.pop(job.id, None)
            new_stage = progress.stage != job.stage
            job.stage, job.step, job.total = progress.stage, progress.step, progress.total
            if overall is not None:
                job.progress = overall
            if progress.stage == "fit" and progress.metrics:
                job.metrics = {k: float(v) for k, v in progress.metrics.items()}
            self._touch(job, message=label)
            if new_stage:
                self._persist(job)

    def _note(self, job: Job, text: str) -> None:
        """The runner's word on its running job (e.g. a Ray worker lost), shown as the job's message."""
        with self._lock:
            if job.state == RUNNING:
                self._touch(job, message=text)

    # ------------------------------------------------------------------ bookkeeping (callers hold the lock)

    def _enqueue(self, job: Job, message: str = "Waiting for its turn") -> None:
        self._queue.append(job.id)
        self._touch(job, state=QUEUED, device=None, message=message)
        self._persist(job)
        self._lock.notify_all()

    def _finish(self, job: Job, state: str, message: str, error: dict | None = None) -> None:
        if state == DONE:
            job.progress = 1.0
        job.error = error
        self._touch(job, state=state, message=message)
        self._persist(job)

    def _touch(self, job: Job, **changes) -> None:
        for key, value in changes.items():
            setattr(job, key, value)
        job.updated = time.time()
        self._versions[job.id] = self._versions.get(job.id, 0) + 1
        self._lock.notify_all()

    def _persist(self, job: Job, strict: bool = False) -> None:
        """Save job.json. A failure is logged and the state stays right in memory (a full disk must not stop a
        worker), unless `strict`: then a full disk raises DiskFullError (507) and anything else OSError."""
        try:
            atomic_write_json(self.jobs_dir / job.id / JOB_FILE, job.to_record())
        except (OSError, EngineError) as exc:
            if strict:
                raise _disk_full(exc) if is_disk_full(exc) else exc
            log.warning("job %s: could not save %s (%s)", job.id, JOB_FILE, exc)

    def _write_folder_status(self, job: Job) -> None:
        try:
            OutputDir(self.jobs_dir / job.id).set_status(job.state, job.stage, job.message)
        except (OSError, EngineError) as exc:
            log.warning("job %s: could not save status.json (%s)", job.id, exc)

    def _new_id(self) -> str:
        while True:
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            if job_id not in self._jobs and not (self.jobs_dir / job_id).exists():
                return job_id

    def _load(self) -> None:
        with self._lock:
            self._load_folders()

    def remove_stale_temporaries(self) -> int:
        """Temporary files a killed server left half-written in the job folders (only the folder's lock holder
        may call this: a live server's writers use such names)."""
        removed = sum(remove_stale_temporaries(folder) for folder in self.jobs_dir.iterdir() if folder.is_dir())
        if removed:
            log.info("removed %d temporary file(s) left by an earlier server", removed)
        return removed

    def _load_folders(self) -> None:
        """List the jobs already in the folder; those that were queued or running when the server stopped are
        interrupted, unless the pipeline's status.json says it finished."""
        for folder in sorted(p for p in self.jobs_dir.iterdir() if (p / JOB_FILE).is_file()):
            try:
                job = Job.from_record(json.loads((folder / JOB_FILE).read_text()))
            except (OSError, TypeError, ValueError, KeyError) as exc:
                log.warning("skipping %s: unreadable %s (%s)", folder, JOB_FILE, exc)
                continue
            if job.id != folder.name:
                job.id = folder.name
            if job.state in (QUEUED, RUNNING):
                status = OutputDir(folder).read_status() or {}
                if status.get("state") == DONE:
                    self._finish(job, DONE, "Done")
                elif job.cancel_requested:  # cancelled, and the server stopped before the job did
                    self._finish(job, CANCELLED, "Cancelled; its last checkpoint is kept")
                    self._write_folder_status(job)
                else:
                    self._finish(job, INTERRUPTED, "The server stopped before this job finished; "
                                                   "resume it to go on from its last checkpoint")
                    self._write_folder_status(job)  # the folder's status.json still says "running"
            self._jobs[job.id] = job


def _takes(runner: Callable, name: str) -> bool:
    """Whether the runner accepts `name=` (Reconstructor takes device and check_cancel; test runners may not)."""
    try:
        params = inspect.signature(runner).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


def _disk_full(exc: BaseException) -> DiskFullError:
    """The server's DiskFullError for a failed write (raw ENOSPC/EDQUOT, or the writers' DiskFullError)."""
    os_error = exc if isinstance(exc, OSError) else exc.__cause__
    where = f" writing {os_error.filename}" if getattr(os_error, "filename", None) else ""
    return DiskFullError(f"The server's disk is full{where}.",
                         "Free disk space (old jobs in the server's data folder can be deleted) and try again.")


def _image_extension(data: bytes, filename: str) -> str:
    for magic, ext in IMAGE_EXTENSIONS.items():
        if data.startswith(magic):
            return ext
    suffix = Path(filename).suffix.lstrip(".").lower()
    return suffix if suffix.isalnum() and len(suffix) <= 5 else "img"
