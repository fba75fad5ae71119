"""`realfusion batch`: every photo of a folder reconstructed, one after the other or spread over Ray.

OUT/<photo>/ is what `reconstruct` writes for that photo (status.json, checkpoints, results) and
OUT/batch.json is the summary of the whole batch, rewritten atomically whenever a photo starts or
ends. A photo whose status.json says `done` is skipped; any other runs with resume on, so an
interrupted one goes on from its checkpoint.

Without Ray the photos run in order in this process on one model (one `ModelCache`). With Ray
(`--ray ADDRESS`, `--ray local`, or `--workers N`), each worker is an actor pinned to one GPU
(`num_gpus=1`; one CPU when the cluster has no GPU) that keeps its model loaded between photos and
writes into the output folder, which every node must see at the same path. A worker that dies
mid-photo is replaced and the photo goes to the next free worker, which resumes it from its
checkpoint; a photo that fails on its own (an `EngineError`: a bad image, ...) is reported in the
summary and not retried in this batch (running the batch again tries it again).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .config import ReconstructionConfig, build_config
from .errors import DeviceError, EngineError, InputImageError
from .outputs import STATUS_FILE, OutputDir, atomic_write_json
from . import ray_cluster
from .ray_cluster import check_gpu_share, first_line as _first_line, import_ray as _import_ray

log = logging.getLogger("realfusion.batch")

SUMMARY_FILE = "batch.json"
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# The results listed in a photo's "files" (relative to OUT), when present; the mesh's name comes from status.json.
RESULT_FILES = ("reference.png", "preview.png", "turntable.png", "camera.json", "export.json", "field.pt")

PENDING, RUNNING, DONE, FAILED, INTERRUPTED = "pending", "running", "done", "failed", "interrupted"


@dataclass
class BatchSettings:
    """What `realfusion batch` was asked for; the reconstruction settings are those of `reconstruct`."""

    preset: str = "standard"
    method: str = "realfusion"
    model: str | None = None
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    device: str = "auto"  # local: as for reconstruct; Ray: cpu forces CPU workers, auto/cuda use the GPUs
    cache_dir: Path | None = None  # learned embeddings (None: engine.pipeline.default_cache_dir(), per node)
    ray: str | None = None  # None: no Ray unless `workers` is given; "local": start one here; else an address
    workers: int | None = None  # Ray workers (None: one per GPU of the cluster, or one CPU worker)
    gpus_per_worker: float = 1.0  # below 1 puts several workers on one GPU (to show the plumbing on one GPU)
    max_attempts: int = 3  # tries of one photo whose worker keeps dying before it is reported failed
    worker_start_timeout_s: float = 300.0  # how long to wait for the first Ray worker before giving up

    @property
    def uses_ray(self) -> bool:
        return self.ray is not None or self.workers is not None

    def config(self) -> ReconstructionConfig:
        return build_config(self.preset, self.overrides, seed=self.seed, method=self.method, model=self.model)


@dataclass
class Photo:
    name: str  # its folder under OUT
    image: Path


@dataclass
class PhotoResult:
    """One photo's line in batch.json."""

    name: str
    image: str
    output: str
    state: str = PENDING  # pending | running | done | failed | interrupted
    skipped: bool = False  # done before this batch started
    seconds: float | None = None  # wall time of its last run
    steps: int | None = None  # fit steps of the result
    resumed_from_step: int = 0  # the fit step the last run went on from (0: from the start)
    attempts: int = 0  # runs started in this batch (a worker that died counts one)
    files: list[str] = field(default_factory=list)  # results present, relative to OUT
    error: dict | None = None  # {"problem", "fix"} when failed
    worker: dict | None = None  # {"pid", "host", "device"} of the run's worker
    lost_workers: list[dict] = field(default_factory=list)  # workers that died running it, with the reason


class StableDiffusionPriors:
    """The prior of every photo: Stable Diffusion taken from the worker's ModelCache.

    A prior source is any picklable callable (photo, models) -> the `prior` for `reconstruct`, so a Ray
    actor can build it where it runs; the benchmark hands in an oracle one instead."""

    def __init__(self, model: str | None = None, cache_dir: Path | None = None):
        self.model, self.cache_dir = model, cache_dir

    def __call__(self, photo: Path, models):
        from .pipeline import stable_diffusion_prior

        return stable_diffusion_prior(self.model, self.cache_dir, models=models)


PriorSource = Callable[[Path, object], Callable]


# ---------------------------------------------------------------------------------------- the photos


def find_photos(folder: Path) -> list[Photo]:
    """The photos directly in `folder` (by extension, sorted by name), each with its own output folder name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"The photo folder {folder} does not exist or is not a folder.",
                              "Give a folder of photos (PNG or JPEG), e.g. `realfusion batch photos/ -o out/`.")
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in PHOTO_EXTENSIONS)
    if not images:
        raise InputImageError(f"There is no photo in {folder} (looked for {', '.join(PHOTO_EXTENSIONS)}).",
                              "Put the photos directly in that folder (subfolders are not searched).")
    stems = [p.stem for p in images]
    # a.png and a.jpg both present: name their folders a.png and a.jpg so neither overwrites the other
    return [Photo(p.stem if stems.count(p.stem) == 1 else p.name, p.resolve()) for p in images]


def _read_status(folder: Path) -> dict:
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _result_files(out_root: Path, name: str) -> list[str]:
    folder = out_root / name
    mesh = _read_status(folder).get("mesh")
    names = [*RESULT_FILES[:3], *([mesh] if mesh else []), *RESULT_FILES[3:]]
    return [f"{name}/{n}" for n in names if (folder / n).is_file()]


# ---------------------------------------------------------------------------------------- one photo


def run_photo(photo: Photo, out_root: Path, cfg: ReconstructionConfig, device: str | None, priors: PriorSource,
              models, listener: Callable | None = None) -> PhotoResult:
    """Reconstruct one photo into OUT/<name> (resuming from its checkpoint); never raises for a failed photo.

    `listener(name, progress)` hears the pipeline's Progress records (it may raise KeyboardInterrupt)."""
    from .pipeline import reconstruct

    result = PhotoResult(photo.name, str(photo.image), str(Path(out_root) / photo.name), state=RUNNING)
    first_fit_step = None

    def report(progress) -> None:
        nonlocal first_fit_step
        if progress.stage == "fit" and first_fit_step is None:
            first_fit_step = progress.step  # the step after the checkpoint the fit went on from
        if listener is not None:
            listener(photo.name, progress)

    started = time.monotonic()
    try:
        out = reconstruct(photo.image, Path(out_root) / photo.name, cfg, device=device,
                          prior=priors(photo.image, models), report=report, resume=True)
        result.state, result.steps = DONE, (out.read_status() or {}).get("steps")
    except EngineError as exc:  # the photo's own fault (bad image, no object, export impossible, ...)
        result.state, result.error = FAILED, {"problem": exc.problem, "fix": exc.fix}
    except Exception as exc:  # a bug or a resource problem: report it, go on with the other photos
        log.exception("photo %s failed", photo.name)
        if "out of memory" in str(exc).lower() and hasattr(models, "clear"):
            models.clear()  # the next photo loads the model again rather than failing the same way
        result.state = FAILED
        result.error = {"problem": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500],
                        "fix": "If this is out of GPU memory, run it again with a smaller preset or --set "
                               "render.random_resolution=64; otherwise it is a bug: the log has the traceback."}
    result.seconds = round(time.monotonic() - started, 3)
    result.resumed_from_step = max(0, first_fit_step - 1) if first_fit_step else 0
    result.files = _result_files(Path(out_root), photo.name)
    return result


# ---------------------------------------------------------------------------------------- the summary


class BatchSummary:
    """OUT/batch.json: every photo's PhotoResult, saved atomically on every change (the driver is its one writer)."""

    def __init__(self, out_root: Path, photos: list[Photo], settings: BatchSettings, input_dir: Path):
        self.path = Path(out_root) / SUMMARY_FILE
        self.out_root = Path(out_root)
        self.input_dir = Path(input_dir)
        self.settings = settings
        self.started = time.time()
        previous = self._previous()
        self.results: dict[str, PhotoResult] = {}
        for photo in photos:
            result = PhotoResult(photo.name, str(photo.image), str(self.out_root / photo.name))
            if _read_status(self.out_root / photo.name).get("state") == DONE:
                old = previous.get(photo.name, {})
                result.state, result.skipped = DONE, True
                result.seconds, result.steps = old.get("seconds"), _read_status(self.out_root / photo.name).get("steps")
                result.files = _result_files(self.out_root, photo.name)
            self.results[photo.name] = result

    def _previous(self) -> dict[str, dict]:
        try:
            return {p["name"]: p for p in json.loads(self.path.read_text()).get("photos", [])}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def pending(self, photos: list[Photo]) -> list[Photo]:
        return [p for p in photos if self.results[p.name].state != DONE]

    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in (DONE, FAILED, RUNNING, PENDING, INTERRUPTED)}
        for result in self.results.values():
            counts[result.state] += 1
        counts["skipped"] = sum(r.skipped for r in self.results.values())
        return counts

    def start(self, name: str, worker: dict | None) -> None:
        result = self.results[name]
        result.state, result.worker, result.error = RUNNING, worker, None
        result.attempts += 1
        self.save()

    def finish(self, result: PhotoResult) -> None:
        previous = self.results[result.name]
        result.attempts, result.lost_workers = previous.attempts, previous.lost_workers
        result.worker = result.worker or previous.worker
        self.results[result.name] = result
        self.save()

    def lost_worker(self, name: str, reason: str, retry: bool) -> None:
        result = self.results[name]
        result.lost_workers.append({**(result.worker or {}), "reason": reason})
        if retry:
            result.state = PENDING
        else:
            result.state = FAILED
            result.error = {"problem": f"Its worker died {len(result.lost_workers)} times while running it "
                                       f"(last: {reason}).",
                            "fix": "Check the workers' memory (a worker killed for memory dies like this) and the "
                                   "Ray logs; running the batch again resumes it from its checkpoint."}
            result.files = _result_files(self.out_root, name)
        self.save()

    def interrupt_running(self) -> None:
        for result in self.results.values():
            if result.state == RUNNING:
                result.state = INTERRUPTED
        self.save()

    def save(self, finished: bool = False) -> None:
        data = {
            "input": str(self.input_dir), "output": str(self.out_root),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.settings).items()},
            "started": self.started, "updated": time.time(), "finished": finished,
            "counts": self.counts(),
            "photos": [asdict(r) for r in self.results.values()],
        }
        atomic_write_json(self.path, data)


# ---------------------------------------------------------------------------------------- progress


class BatchProgress:
    """What a batch tells its watcher; this one says nothing (tests and the benchmark use it)."""

    def begin(self, total: int, done: int) -> None: ...
    def photo_started(self, name: str) -> None: ...
    def photo_progress(self, name: str, progress) -> None: ...
    def photo_finished(self, result: PhotoResult) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


class BatchProgressBar(BatchProgress):
    """One tqdm bar over the photos; its postfix shows the running photos (and their stage, when local)."""

    def __init__(self, stream=None):
        import sys

        self._stream = stream or sys.stderr
        self._bar = None
        self._running: dict[str, str] = {}
        self._failed = 0
        self._last_refresh = 0.0

    def begin(self, total: int, done: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=done, desc="batch", unit="photo", file=self._stream,
                         dynamic_ncols=True)

    def photo_started(self, name: str) -> None:
        self._running[name] = "starting"
        self._refresh(force=True)

    def photo_progress(self, name: str, progress) -> None:
        self._running[name] = f"{progress.stage} {progress.step}/{progress.total}" if progress.total else progress.stage
        self._refresh()

    def photo_finished(self, result: PhotoResult) -> None:
        self._running.pop(result.name, None)
        if result.state == FAILED:
            self._failed += 1
            self.note(f"{result.name}: failed: {result.error['problem'] if result.error else ''}")
        if self._bar is not None and result.state == DONE:
            self._bar.update(1)
        self._refresh(force=True)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._bar is None or (not force and now - self._last_refresh < 0.5):
            return
        self._last_refresh = now
        parts = [f"{self._failed} failed"] if self._failed else []
        parts += [f"{name}: {state}" for name, state in self._running.items()]
        self._bar.set_postfix_str(", ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------------------- the batch


def run_batch(photos_dir: Path, out_root: Path, settings: BatchSettings, *, priors: PriorSource | None = None,
              progress: BatchProgress | None = None) -> BatchSummary:
    """Reconstruct every photo of `photos_dir` not yet done into `out_root`; returns the summary (also saved).

    Bad settings, an empty folder or an unwritable output folder raise an EngineError before any work."""
    progress = progress or BatchProgress()
    cfg = settings.config()  # a bad --set fails here, before anything is written
    if settings.max_attempts < 1:
        raise EngineError("--max-attempts must be at least 1.", "Use --max-attempts 3 (the default).")
    if settings.workers is not None and settings.workers < 1:
        raise EngineError("--workers must be at least 1.", "Use --workers N with N >= 1, or leave it out.")
    photos = find_photos(photos_dir)
    if not settings.uses_ray:
        from .pipeline import resolve_device

        resolve_device(settings.device)  # --device cuda without a GPU: refused before anything is written
    OutputDir(out_root)  # created and checked writable
    out_root = Path(out_root).resolve()
    ray_started_here = connect(settings) if settings.uses_ray else False  # no cluster: refused before the summary
    try:
        summary = BatchSummary(out_root, photos, settings, Path(photos_dir).resolve())
        todo = summary.pending(photos)
        summary.save()
        priors = priors or StableDiffusionPriors(cache_dir=settings.cache_dir)
        progress.begin(len(photos), len(photos) - len(todo))
        try:
            if todo and settings.uses_ray:
                _RayPool(_import_ray(), todo, out_root, cfg, settings, priors, summary, progress).run()
            elif todo:
                _run_here(todo, out_root, cfg, settings, priors, summary, progress)
        except BaseException:
            summary.interrupt_running()
            raise
        finally:
            progress.close()
    finally:
        if ray_started_here:
            _import_ray().shutdown()
    summary.save(finished=True)
    return summary


def _run_here(todo: list[Photo], out_root: Path, cfg, settings: BatchSettings, priors, summary: BatchSummary,
              progress: BatchProgress) -> None:
    """In this process, one photo after the other, on one model."""
    from .pipeline import ModelCache, resolve_device

    device = str(resolve_device(settings.device))  # a missing GPU fails here, not once per photo
    models = ModelCache()
    worker = {"pid": os.getpid(), "host": socket.gethostname(), "device": device}
    for photo in todo:
        summary.start(photo.name, worker)
        progress.photo_started(photo.name)
        result = run_photo(photo, out_root, cfg, device, priors, models, listener=progress.photo_progress)
        result.worker = worker
        summary.finish(result)
        progress.photo_finished(result)


# ---------------------------------------------------------------------------------------- on Ray


class PhotoWorker:
    """A Ray actor: one device (its GPU, or a CPU), its model kept in a ModelCache between photos."""

    def __init__(self, cfg: ReconstructionConfig, priors: PriorSource, use_gpu: bool, threads: int = 1):
        import torch

        from .pipeline import ModelCache

        if not use_gpu:
            torch.set_num_threads(max(1, threads))  # one CPU per worker: workers on a node must not fight
        self.cfg, self.priors = cfg, priors
        self.device = "cuda" if use_gpu else "cpu"  # Ray's CUDA_VISIBLE_DEVICES makes cuda:0 this actor's GPU
        self.models = ModelCache()

    def info(self, marker: str) -> dict:
        """Who this worker is; refuses to work when it cannot see the batch's output folder."""
        import torch

        if not Path(marker).is_file():  # returned, not raised: the driver raises it as the EngineError it is
            return {"error": {"problem": f"The Ray worker on {socket.gethostname()} cannot see the output folder "
                                         f"({Path(marker).parent}).",
                              "fix": "Put the output folder on storage every node mounts at the same path "
                                     "(NFS, ...)."}}
        device = self.device
        if device == "cuda":
            device = f"cuda ({torch.cuda.get_device_name(0)}, Ray GPU {','.join(map(str, _ray_gpu_ids()))})"
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": device}

    def run(self, photo: Photo, out_root: str) -> PhotoResult:
        return run_photo(photo, Path(out_root), self.cfg, self.device, self.priors, self.models)


def _ray_gpu_ids() -> list:
    import ray

    return ray.get_gpu_ids()


def connect(settings: BatchSettings) -> bool:
    """Join the cluster at --ray ADDRESS, or start a local one; True when this call did (and should shut it down)."""
    return ray_cluster.connect(settings.ray, settings.workers)


class _RayPool:
    """The driver's loop: hand photos to free actors, collect results, replace actors that die."""

    def __init__(self, ray, todo, out_root: Path, cfg, settings: BatchSettings, priors, summary: BatchSummary,
                 progress: BatchProgress):
        self.ray, self.out_root, self.settings = ray, out_root, settings
        self.summary, self.progress = summary, progress
        self.pending = deque(todo)
        gpus = ray.cluster_resources().get("GPU", 0)
        if settings.device.startswith("cuda:"):
            raise DeviceError(f"--device {settings.device} picks one GPU; a Ray batch gives every worker its own.",
                              "Use --device auto (or cuda) with --ray, or drop --ray to run on that one GPU.")
        if settings.device == "cuda" and not gpus:
            raise DeviceError("--device cuda was asked for, but the Ray cluster has no GPU.",
                              "Start the Ray nodes on GPU machines, or use --device cpu (much slower).")
        share = settings.gpus_per_worker
        check_gpu_share(share)
        self.use_gpu = settings.device != "cpu" and gpus > 0
        workers = settings.workers or (max(1, int(gpus / settings.gpus_per_worker)) if self.use_gpu else 1)
        self.count = max(1, min(workers, len(todo)))
        options = {"num_gpus": settings.gpus_per_worker, "num_cpus": 1} if self.use_gpu else {"num_cpus": 1}
        # No automatic restart: a dead actor is replaced by a new one here, so the driver knows which photo to redo.
        self.actor_class = ray.remote(PhotoWorker).options(max_restarts=0, **options)
        self.cfg, self.priors = cfg, priors
        self.marker = out_root / f".batch-{os.getpid()}-{int(time.time())}"
        self.starting: dict = {}  # info ref -> actor
        self.idle: deque = deque()  # (actor, info)
        self.running: dict = {}  # run ref -> (actor, info, photo)
        self.workers_started = 0  # workers that reported ready (replacements too)
        self.respawns = 0  # replacements that died while starting

    def _spawn(self) -> None:
        actor = self.actor_class.remote(self.cfg, self.priors, self.use_gpu)
        self.starting[actor.info.remote(str(self.marker))] = actor

    def run(self) -> None:
        self.marker.write_text("realfusion batch\n")
        try:
            for _ in range(self.count):
                self._spawn()
            self.progress.note(f"{self.count} Ray worker(s) on {'GPU' if self.use_gpu else 'CPU'}, "
                               f"{len(self.pending)} photo(s) to do")
            waiting_since = time.monotonic()
            while self.pending or self.running:
                self._dispatch()
                refs = [*self.starting, *self.running]
                ready = self.ray.wait(refs, num_returns=1, timeout=1.0)[0] if refs else []
                for ref in ready:
                    if ref in self.starting:
                        self._started(ref)
                    else:
                        self._finished(ref)
                self._show_stages()
                if self.running or self.idle:
                    waiting_since = time.monotonic()
                elif time.monotonic() - waiting_since > self.settings.worker_start_timeout_s:
                    raise DeviceError(f"No Ray worker could start in {self.settings.worker_start_timeout_s:.0f} s "
                                      f"(each needs {'a GPU' if self.use_gpu else 'a CPU'}).",
                                      "Check `ray status` for free resources, or ask for fewer --workers.")
        finally:
            actors = [*self.starting.values(), *(a for a, _ in self.idle), *(a for a, _, _ in self.running.values())]
            for actor in actors:
                self.ray.kill(actor)
            self.marker.unlink(missing_ok=True)

    def _show_stages(self) -> None:
        """The running photos' stages, from their status.json (the workers' progress stays in the workers)."""
        from .pipeline import Progress

        for _actor, _info, photo in self.running.values():
            stage = _read_status(self.out_root / photo.name).get("stage")
            if stage:
                self.progress.photo_progress(photo.name, Progress(stage))

    def _dispatch(self) -> None:
        while self.pending and self.idle:
            (actor, info), photo = self.idle.popleft(), self.pending.popleft()
            self.summary.start(photo.name, info)
            self.progress.photo_started(photo.name)
            self.running[actor.run.remote(photo, str(self.out_root))] = (actor, info, photo)

    def _started(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            if self.workers_started and self.respawns < self.count * self.settings.max_attempts:
                # a replacement died while starting (its node went away, ...): the others go on; try once more
                self.respawns += 1
                self.progress.note(f"a Ray worker died while starting ({_first_line(exc)}); starting another")
                self._spawn()
                return
            raise EngineError(f"A Ray worker could not start ({_first_line(exc)}).",
                              "Check that every node has the engine installed (same Python and packages) "
                              "and read the Ray logs (/tmp/ray/session_latest/logs).") from exc
        except self.ray.exceptions.RayTaskError as exc:
            raise EngineError(f"A Ray worker could not start ({_first_line(exc)}).",
                              "Check that every node has the engine installed (same Python and packages) "
                              "and read the Ray logs (/tmp/ray/session_latest/logs).") from exc
        if "error" in info:
            raise EngineError(info["error"]["problem"], info["error"]["fix"])
        self.workers_started += 1
        self.idle.append((actor, info))

    def _finished(self, ref) -> None:
        actor, info, photo = self.running.pop(ref)
        try:
            result: PhotoResult = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:  # the worker died (killed, out of memory, node lost)
            reason = _first_line(exc)
            retry = self.summary.results[photo.name].attempts < self.settings.max_attempts
            self.summary.lost_worker(photo.name, reason, retry)
            self.progress.note(f"{photo.name}: worker {info.get('pid')} on {info.get('host')} died"
                               f"{'; it goes on from its checkpoint on the next free worker' if retry else ''}")
            if retry:
                self.pending.appendleft(photo)  # before the photos not started yet
            else:
                self.progress.photo_finished(self.summary.results[photo.name])
            self.ray.kill(actor)  # dead already; make sure it never comes back to write the same folder
            self._spawn()
            return
        except self.ray.exceptions.RayTaskError as exc:  # run_photo itself failed (it catches photo errors)
            result = PhotoResult(photo.name, str(photo.image), str(self.out_root / photo.name), state=FAILED,
                                 error={"problem": f"The worker failed: {_first_line(exc)}",
                                        "fix": "This is a bug; the Ray logs have the traceback."})
        result.worker = info
        self.summary.finish(result)
        self.progress.photo_finished(result)
        self.idle.append((actor, info))

