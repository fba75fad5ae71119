"""`realfusion serve --ray ADDRESS`: the job server's workers are Ray actors, so one URL drives a farm.

Everything the API shows stays the JobStore's (engine/server/jobs.py): the queue, the states, job.json,
progress, events, cancel and resume, the on-disk layout. Only where a job runs changes: each JobStore
worker thread is a *slot* that drives one Ray actor (`JobWorker`, pinned to one GPU with `num_gpus`,
or to one CPU), which keeps its model loaded between jobs and writes into the job's folder. The data
folder must therefore be on storage every node mounts at the same path (as for `batch --ray`).

The slot's thread hands the actor a job, relays its progress records (polled a few times a second),
and passes a cancel on. An actor that dies mid-job (killed, out of memory, node lost) is replaced and
the job goes on from its checkpoint on the new actor, up to `max_attempts` runs; a job that fails for
its own reasons (an EngineError: bad settings, no object found, ...) fails as it would locally.
`--ray local` (or no cluster) starts a local Ray cluster, exactly as `realfusion batch --ray local`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from ..errors import DeviceError, EngineError
from ..progress import Progress
from ..ray_cluster import check_gpu_share, connect, first_line, import_ray
from .jobs import (JobCancelled, JobSettings, Reconstructor, ServerSettings, overall_progress, process_memory_bytes,
                   resource_error)

log = logging.getLogger("realfusion.server")

POLL_S = 0.25  # how often a slot asks its actor for progress (and checks for a cancel)
CANCEL_GRACE_S = 20.0  # an actor that has not stopped this long after a cancel is killed (and replaced)
INFO_TIMEOUT_S = 2.0  # /health waits this long for the actors' reports, then shows the last ones


class JobWorkerLost(EngineError):
    """The job's Ray workers kept dying; it failed, and its checkpoint is kept for a resume."""


class RemoteJobError(EngineError):
    """A job failed on its Ray worker for its own reasons (the worker's EngineError, carried back)."""


class JobWorker:
    """The Ray actor: one device (its GPU, or a CPU), a Reconstructor with its model kept between jobs.

    A threaded actor (max_concurrency > 1): `poll`, `cancel` and `info` answer while `run` works."""

    def __init__(self, settings: ServerSettings, prior_factory: Callable | None, use_gpu: bool):
        import torch

        if not use_gpu:
            torch.set_num_threads(1)  # one CPU per worker: the workers of a node must not fight over the cores
        self.device = "cuda" if use_gpu else "cpu"  # Ray's CUDA_VISIBLE_DEVICES makes cuda:0 this actor's GPU
        local = dataclasses.replace(settings, device=self.device, gpus=None, ray=None)
        self.reconstructor = Reconstructor(local, prior_factory)
        self._lock = threading.Lock()
        self._progress: list[Progress] = []
        self._cancel = threading.Event()
        self._running: str | None = None

    def info(self) -> dict:
        """Who and where this worker is, what it holds: its device, its GPU's memory, its model."""
        import torch

        info = {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device, "gpu": None,
                "gpu_memory": None, "memory_bytes": process_memory_bytes(), "running": self._running,
                "model_loaded": None, "model_loads": 0}
        if self.device == "cuda":
            import ray

            free, total = torch.cuda.mem_get_info(0)
            info["gpu"] = f"{torch.cuda.get_device_name(0)} (Ray GPU {','.join(map(str, ray.get_gpu_ids()))})"
            info["gpu_memory"] = {"free_bytes": free, "total_bytes": total,
                                  "used_by_server_bytes": torch.cuda.memory_reserved(0)}
        caches = self.reconstructor.caches
        loaded = [c.loaded for c in caches.values() if c.loaded is not None]
        info["model_loaded"] = loaded[0] if loaded else None
        info["model_loads"] = sum(c.loads for c in caches.values())
        return info

    def run(self, job_id: str, job: JobSettings, folder: str) -> dict:
        """Run one job into `folder` (resuming from its checkpoint); the outcome as data, never raised, so the
        driver tells a worker that died (RayActorError) from a job that failed."""
        self._cancel.clear()
        with self._lock:
            self._progress.clear()
        self._running = job_id
        try:
            if not (Path(folder) / job.input).is_file():
                return {"state": "failed",
                        "problem": f"The Ray worker on {socket.gethostname()} cannot see the job folder {folder}.",
                        "fix": "Put the server's data folder (--data-dir) on storage every Ray node mounts at the "
                               "same path (NFS, ...)."}
            self.reconstructor(job, Path(folder), self._report, device=self.device, check_cancel=self._check)
            return {"state": "done"}
        except JobCancelled:
            return {"state": "cancelled"}
        except EngineError as exc:
            return {"state": "failed", "problem": exc.problem, "fix": exc.fix}
        except (Exception, MemoryError) as exc:  # noqa: BLE001 - carried back to the driver, which decides
            error = resource_error(exc)
            if error is not None:
                return {"state": "failed", **error}
            return {"state": "error", "problem": f"{type(exc).__name__}: {exc}"[:1000],
                    "traceback": traceback.format_exc()[-8000:]}
        finally:
            self._running = None

    def poll(self) -> list[Progress]:
        """The progress records since the last poll (of one stage, only the latest)."""
        with self._lock:
            records, self._progress = self._progress, []
        return records

    def cancel(self) -> None:
        self._cancel.set()

    def _check(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()

    def _report(self, progress: Progress) -> None:
        self._check()
        record = Progress(progress.stage, progress.step, progress.total,
                          {k: float(v) for k, v in (progress.metrics or {}).items()})
        with self._lock:
            if self._progress and self._progress[-1].stage == record.stage:
                self._progress[-1] = record  # the driver needs the latest step of a stage, not every one
            else:
                self._progress.append(record)


@dataclasses.dataclass
class _Slot:
    """One JobStore worker's actor, replaced when it dies."""

    index: int
    actor: object = None
    info: dict | None = None  # its last report (info())
    ready: bool = False
    info_ref: object = None  # its info() call made at the start, answered once the worker process is up
    replaced: int = 0  # actors of this slot that died and were replaced
    last_death: str | None = None


class RayJobRunner:
    """The JobStore's runner when the server uses a Ray pool: same calls as Reconstructor, work on actors.

    Its devices are slot names ("ray:0", "ray:1", ...), one JobStore worker thread each; `slot_info`
    says what each slot's actor reports about itself (for /health)."""

    def __init__(self, settings: ServerSettings, prior_factory: Callable | None = None):
        self.settings = settings
        self._local = Reconstructor(settings, prior_factory)  # validates jobs here, before they are queued
        self.ray = import_ray("`realfusion serve --ray`")
        self._started_here = connect(settings.ray, settings.workers, what="`realfusion serve --ray`")
        try:
            gpus = self.ray.cluster_resources().get("GPU", 0)
            if str(settings.device).startswith("cuda") and not gpus:
                raise DeviceError("--device cuda was asked for, but the Ray cluster has no GPU.",
                                  "Start the Ray nodes on GPU machines, or leave --device out (CPU workers).")
            share = settings.gpus_per_worker
            check_gpu_share(share)
            if settings.workers is not None and settings.workers < 1:
                raise EngineError("--workers must be at least 1.", "Use --workers N with N >= 1, or leave it out.")
            self.use_gpu = settings.device != "cpu" and gpus > 0
            count = settings.workers or (max(1, int(gpus / share)) if self.use_gpu else 1)
            options = {"num_gpus": share, "num_cpus": 1} if self.use_gpu else {"num_cpus": 1}
            # No automatic restart: a slot replaces its dead actor itself, so it knows which job to go on with.
            self._actor_class = self.ray.remote(JobWorker).options(max_restarts=0, max_concurrency=4, **options)
            self._prior_factory = prior_factory
            self._lock = threading.Lock()
            self._slots = [_Slot(i) for i in range(count)]
            for slot in self._slots:
                self._spawn(slot)  # start now: the first job need not wait for a worker process
        except BaseException:
            self.shutdown()
            raise

    # ---------------------------------------------------------------- what the JobStore and the app call

    def devices(self) -> list[str]:
        return [f"ray:{slot.index}" for slot in self._slots]

    def config(self, job: JobSettings):
        return self._local.config(job)

    def check(self, job: JobSettings, folder: Path) -> None:
        self._local.check(job, folder)

    @property
    def caches(self) -> dict:
        return {}  # the models live in the actors: see slot_info

    def __call__(self, job: JobSettings, folder: Path, report: Callable, device: str | None = None,
                 check_cancel: Callable[[], None] | None = None, note: Callable[[str], None] | None = None) -> None:
        slot = self._slots[int(str(device or "ray:0").split(":")[1])]
        check_cancel = check_cancel or (lambda: None)
        floor = None  # after a lost worker: progress below this (early stages run again) is not shown
        shown = [0.0]
        for attempt in range(1, self.settings.max_attempts + 1):
            actor = self._ready_actor(slot, check_cancel)
            ref = actor.run.remote(folder.name, job, str(folder))
            try:
                outcome = self._follow(slot, actor, ref, report, check_cancel, floor, shown)
            except self.ray.exceptions.RayActorError as exc:  # the worker died: killed, out of memory, node lost
                reason = first_line(exc)
                self._lost(slot, actor, reason)
                log.warning("job %s: its Ray worker %s died (%s); %s", folder.name, (slot.info or {}).get("pid"),
                            reason, "going on from its checkpoint on a new worker"
                            if attempt < self.settings.max_attempts else "giving up")
                floor = shown[0]
                if note is not None and attempt < self.settings.max_attempts:
                    note(f"Its Ray worker died ({reason}); going on from its last checkpoint on a new worker")
                continue
            return self._outcome(folder.name, outcome)
        raise JobWorkerLost(f"Its Ray worker died {self.settings.max_attempts} times while running it.",
                            "Check the workers' memory (a worker killed for memory dies like this) and the Ray "
                            "logs; resume the job to go on from its checkpoint.")

    def slot_info(self) -> dict[str, dict]:
        """device ("ray:N") -> what its actor reports (pid, host, device, gpu, gpu_memory, memory, model), fresh
        when it answers within INFO_TIMEOUT_S, else the last report; with `replaced` and `last_death`."""
        with self._lock:
            asked = {slot.index: slot.actor.info.remote() for slot in self._slots if slot.actor is not None}
        if asked:
            ready, _ = self.ray.wait(list(asked.values()), num_returns=len(asked), timeout=INFO_TIMEOUT_S)
            ready = set(ready)
            for index, ref in asked.items():
                if ref in ready:
                    try:
                        self._slots[index].info = self.ray.get(ref)
                        self._slots[index].ready = True  # it answers: its process is up
                    except self.ray.exceptions.RayError:
                        pass  # died just now: its slot replaces it when it next runs a job
        return {f"ray:{slot.index}": {**(slot.info or {}), "ready": slot.ready, "replaced": slot.replaced,
                                      "last_death": slot.last_death} for slot in self._slots}

    def shutdown(self) -> None:
        """Stop the actors, and the local cluster when this server started it."""
        for slot in getattr(self, "_slots", []):
            if slot.actor is not None:
                try:
                    self.ray.kill(slot.actor)
                except Exception:  # noqa: BLE001 - gone already
                    pass
                slot.actor = None
        if self._started_here and self.ray.is_initialized():
            self.ray.shutdown()

    # ---------------------------------------------------------------- the slots

    def _spawn(self, slot: _Slot) -> None:
        with self._lock:
            slot.actor = self._actor_class.remote(self.settings, self._prior_factory, self.use_gpu)
            slot.ready = False
            slot.info_ref = slot.actor.info.remote()

    def _ready_actor(self, slot: _Slot, check_cancel: Callable[[], None]):
        """The slot's actor once it answers; a new one if it died starting (cancel checked while waiting)."""
        started, deaths = time.monotonic(), 0
        while True:
            if slot.actor is None:
                self._spawn(slot)
            if slot.ready:
                return slot.actor
            done, _ = self.ray.wait([slot.info_ref], timeout=POLL_S)
            if done:
                try:
                    slot.info = self.ray.get(slot.info_ref)
                    slot.ready = True
                    return slot.actor
                except self.ray.exceptions.RayActorError as exc:
                    deaths += 1
                    self._lost(slot, slot.actor, first_line(exc))
                    if deaths >= self.settings.max_attempts:
                        raise EngineError(f"A Ray worker could not start ({first_line(exc)}).",
                                          "Check that every node has the engine installed (same Python and "
                                          "packages) and read the Ray logs (/tmp/ray/session_latest/logs).") from exc
                    continue
            check_cancel()
            if time.monotonic() - started > self.settings.worker_start_timeout_s:
                raise DeviceError(f"No Ray worker could start in {self.settings.worker_start_timeout_s:.0f} s "
                                  f"(each needs {'a GPU' if self.use_gpu else 'a CPU'}).",
                                  "Check `ray status` for free resources, or start the server with fewer --workers.")

    def _lost(self, slot: _Slot, actor, reason: str) -> None:
        try:
            self.ray.kill(actor)  # dead already, or stuck: it must never come back to write the same folder
        except Exception:  # noqa: BLE001
            pass
        with self._lock:
            if slot.actor is actor:
                slot.actor, slot.ready = None, False
            slot.replaced += 1
            slot.last_death = reason

    def _follow(self, slot: _Slot, actor, ref, report: Callable, check_cancel: Callable[[], None],
                floor: float | None, shown: list) -> dict:
        """Relay the actor's progress until its run ends; pass a cancel on (and kill an actor that ignores it)."""
        cancelled_at = None
        while True:
            done, _ = self.ray.wait([ref], timeout=POLL_S)
            for progress in self.ray.get(actor.poll.remote()):
                overall = overall_progress(progress.stage, progress.step, progress.total)
                if floor is not None and overall is not None and overall < floor:
                    continue  # a retry runs the early stages again before the fit goes on from its checkpoint
                floor = None
                if overall is not None:
                    shown[0] = overall
                try:
                    report(progress)
                except JobCancelled:
                    pass  # the cancel check below passes it on
            if done:
                return self.ray.get(ref)
            if cancelled_at is None:
                try:
                    check_cancel()
                except JobCancelled:
                    actor.cancel.remote()
                    cancelled_at = time.monotonic()
            elif time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                self._lost(slot, actor, "did not stop when cancelled")
                raise JobCancelled()

    def _outcome(self, job_id: str, outcome: dict) -> None:
        state = outcome.get("state")
        if state == "done":
            return
        if state == "cancelled":
            raise JobCancelled()
        if state == "failed":
            raise RemoteJobError(outcome["problem"], outcome["fix"])
        log.error("job %s: internal error on its Ray worker:\n%s", job_id, outcome.get("traceback", ""))
        raise RuntimeError(outcome.get("problem", "unknown error on the Ray worker"))
