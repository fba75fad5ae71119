# SPDX-License-Identifier: GPL-3.0-or-later
"""Reconstruction jobs: HTTP in a worker thread, every `bpy` change on the main thread.

`JobWorker` (a thread, no `bpy`) submits a photo or follows an existing job, polls the
engine, fetches the preview while it changes and downloads the results when the job is
done. It only ever puts `Update`s on a queue. The main thread drains that queue in
`poll_job_once` (called from the Reconstruct operator's TIMER event, or directly by tests,
since timers and modal operators never fire in background `bpy`) and `apply_update` writes
each one into the scene's job list.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field

from .client import TERMINAL_STATES, EngineClient, EngineError

RESULT_FILES = ("mesh.glb", "camera.json")  # what the import needs
OPTIONAL_FILES = ("reference.png", "turntable.png", "export.json")  # fetched when the engine has them
PREVIEW_EVERY_S = 1.0  # fetch preview.png at most this often
OFFLINE_GRACE_S = 15.0  # an engine that stops answering mid-job is given this long before we give up

# Local states on top of the engine's: "submitting" (no engine id yet), "checking" (following a
# job again, no answer yet), "unreachable" (the engine stopped answering; the job may go on there).
ACTIVE_STATES = ("submitting", "checking", "queued", "running")


@dataclass
class Update:
    """One snapshot of a job, from the worker thread to the main thread."""

    key: str
    state: str = ""
    job_id: str = ""
    stage: str = ""
    step: int = 0
    total: int = 0
    progress: float | None = None
    message: str = ""
    error: dict | None = None  # {"problem", "fix", "kind"}
    eta: float | None = None  # seconds
    queue_position: int | None = None
    preview_path: str = ""
    files: dict = field(default_factory=dict)  # name -> local path, once downloaded
    submit_failed: bool = False  # the job never reached the engine

    @classmethod
    def from_job(cls, key: str, job: dict, **extra) -> "Update":
        progress = job.get("progress")
        return cls(key=key, state=str(job.get("state", "")), job_id=str(job.get("id", "")),
                   stage=str(job.get("stage") or ""), step=int(job.get("step") or 0),
                   total=int(job.get("total") or 0),
                   progress=float(progress) if isinstance(progress, (int, float)) else None,
                   message=str(job.get("message") or ""), error=_error_dict(job.get("error")),
                   queue_position=job.get("queue_position"), **extra)


def _error_dict(error) -> dict | None:
    if isinstance(error, dict) and (error.get("problem") or error.get("fix")):
        return {"problem": str(error.get("problem", "")), "fix": str(error.get("fix", "")), "kind": "engine"}
    if isinstance(error, str) and error:
        return {"problem": error, "fix": "", "kind": "engine"}
    return None


class EtaEstimator:
    """Seconds left from how fast the overall progress moved since the job started running."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.start: tuple[float, float] | None = None

    # Stages whose time says nothing about the rest: loading the model, and the first steps after it
    WARMUP_STAGES = ("", "matting", "prior")

    def __call__(self, state: str, progress: float | None, stage: str = "fit") -> float | None:
        if state != "running" or progress is None or stage in self.WARMUP_STAGES:
            return None
        now = self.clock()
        if self.start is None:
            self.start = (now, progress)
            return None
        t0, p0 = self.start
        if progress <= p0 + 1e-4 or now - t0 < 1.0:
            return None
        return max(0.0, (now - t0) * (1.0 - progress) / (progress - p0))


class JobWorker(threading.Thread):
    """Follows one job on the engine until it ends; talks to the main thread only through `updates`."""

    def __init__(self, client: EngineClient, key: str, folder: str, *, submission: dict | None = None,
                 job_id: str = "", resume: bool = False, poll_interval: float = 0.5):
        super().__init__(name=f"realfusion-job-{key}", daemon=True)
        if not submission and not job_id:
            raise ValueError("a JobWorker needs a submission or the id of a job on the engine")
        self.client = client
        self.key = key
        self.folder = folder
        self.submission = submission
        self.job_id = job_id
        self.resume = resume
        self.poll_interval = poll_interval
        self.updates: queue.Queue[Update] = queue.Queue()
        self._cancel = threading.Event()
        self._detach = threading.Event()
        self._wake = threading.Event()
        self.eta = EtaEstimator()

    # -- main-thread side ---------------------------------------------------------------------

    def cancel(self) -> None:
        """Cancel the job on the engine (the worker sends DELETE and reports the engine's answer)."""
        self._cancel.set()
        self._wake.set()

    def detach(self) -> None:
        """Stop following the job (Blender is closing or loading a file); the engine goes on with it."""
        self._detach.set()
        self._wake.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def drain(self) -> list[Update]:
        updates = []
        while True:
            try:
                updates.append(self.updates.get_nowait())
            except queue.Empty:
                return updates

    # -- worker-thread side -------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self.submission:
                self.updates.put(Update(self.key, state="submitting", message="Sending the photo to the engine"))
                job = self.client.submit(**self.submission)
                self.job_id = str(job["id"])
                self.updates.put(Update.from_job(self.key, job))
            elif self.resume:
                self.updates.put(Update.from_job(self.key, self.client.resume(self.job_id)))
            self._follow()
        except EngineError as exc:
            self.updates.put(Update(self.key, state="failed", job_id=self.job_id, error=exc.as_dict(),
                                    message=exc.problem, submit_failed=not self.job_id))
        except Exception as exc:  # noqa: BLE001 - a bug must still reach the panel, not die in a thread
            self.updates.put(Update(self.key, state="failed", job_id=self.job_id, submit_failed=not self.job_id,
                                    error={"problem": f"The add-on failed: {type(exc).__name__}: {exc}",
                                           "fix": "Please report this with the console output.", "kind": "bug"}))

    def _follow(self) -> None:
        cancel_sent = False
        last_preview = (None, 0.0)
        offline_since = None
        while not self._detach.is_set():
            try:
                if self._cancel.is_set() and not cancel_sent:
                    self.client.cancel(self.job_id)
                    cancel_sent = True
                job = self.client.job(self.job_id)
                offline_since = None
            except EngineError as exc:
                if exc.kind != "offline":
                    raise
                offline_since = offline_since or time.monotonic()
                if time.monotonic() - offline_since > OFFLINE_GRACE_S:
                    self.updates.put(Update(self.key, state="unreachable", job_id=self.job_id,
                                            error=exc.as_dict(), message=exc.problem))
                    return
                self._sleep()
                continue
            state = str(job.get("state", ""))
            extra = {"eta": self.eta(state, job.get("progress"), str(job.get("stage") or ""))}
            preview = job.get("preview")
            moved = (job.get("stage"), job.get("step")) != last_preview[0]
            due = time.monotonic() - last_preview[1] >= PREVIEW_EVERY_S
            if preview and ((moved and due) or state == "done"):
                path = self._download(preview, "preview.png")
                if path:
                    extra["preview_path"] = path
                    last_preview = ((job.get("stage"), job.get("step")), time.monotonic())
            if state in TERMINAL_STATES:
                if state == "done":
                    extra["files"] = self._download_results(job)
                self.updates.put(Update.from_job(self.key, job, **extra))
                return
            self.updates.put(Update.from_job(self.key, job, **extra))
            self._sleep()

    def _sleep(self) -> None:
        self._wake.wait(self.poll_interval)
        self._wake.clear()

    def _download_results(self, job: dict) -> dict:
        urls = job.get("files") or {}
        if urls and "mesh.glb" not in urls:  # the engine lists the files it has
            raise EngineError(f"The engine finished job {self.job_id} without a mesh (no mesh.glb).",
                              "Update the engine (its export writes mesh.glb and camera.json), or run "
                              "`realfusion export` on the job's folder, then press Check Again.",
                              kind="engine-files")
        files = {}
        for name in RESULT_FILES + OPTIONAL_FILES:
            url = urls.get(name)
            if url is None and name in RESULT_FILES:
                url = f"/jobs/{self.job_id}/files/{name}"  # an engine that lists nothing still serves them
            if url is None:
                continue
            try:
                files[name] = self._download(url, name, required=name in RESULT_FILES)
            except EngineError:
                if name in RESULT_FILES:
                    raise
        return files

    def _download(self, url: str, name: str, required: bool = False) -> str:
        try:
            data = self.client.get_bytes(url)
        except EngineError:
            if required:
                raise
            return ""
        return write_file_atomic(os.path.join(self.folder, name), data)


def write_file_atomic(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


# Workers of this Blender session by job key. Module state on purpose: operators, panels and
# load handlers all reach the same ones, and none of them holds a `bpy` object.
WORKERS: dict[str, JobWorker] = {}


def detach_all() -> None:
    for worker in list(WORKERS.values()):
        worker.detach()
    WORKERS.clear()
