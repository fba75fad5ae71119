# SPDX-License-Identifier: GPL-3.0-or-later
"""Reconstruction jobs: HTTP in a follower process, every `bpy` change on the main thread.

`JobFollower` (no `bpy`) submits a photo or follows an existing job, polls the engine,
fetches the preview while it changes and downloads the results when the job is done. It
only ever hands `Update`s to its `emit`. In Blender it runs in a process of its own
(`follower.py`, started by `JobWorker`), never in a thread of Blender's: Blender does not
support Python threads at all, whatever they touch (its Python API docs, "threading"
gotcha), and a follower thread here crashed Blender 3.4 at random while it parsed an HTTP
reply (tests/test_blender_gui.py, about one run in six). The main thread drains each
worker's updates in `poll_job_once` (called from the Reconstruct operator's TIMER event,
or directly by tests, since timers and modal operators never fire in background `bpy`)
and `apply_update` writes each one into the scene's job list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields

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

    def to_line(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_line(cls, line: str) -> "Update":
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError(f"not an update: {line!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

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


class JobFollower:
    """Follows one job on the engine until it ends (`run` blocks); hands every `Update` to `emit`.

    `cancel` and `detach` may come from another thread (the follower process's command reader)."""

    def __init__(self, client: EngineClient, key: str, folder: str, *, submission: dict | None = None,
                 job_id: str = "", resume: bool = False, poll_interval: float = 0.5, emit=None):
        if not submission and not job_id:
            raise ValueError("a JobFollower needs a submission or the id of a job on the engine")
        self.client = client
        self.key = key
        self.folder = folder
        self.submission = submission
        self.job_id = job_id
        self.resume = resume
        self.poll_interval = poll_interval
        self.emit = emit or (lambda update: None)
        self._cancel = threading.Event()
        self._detach = threading.Event()
        self._wake = threading.Event()
        self.eta = EtaEstimator()

    def cancel(self) -> None:
        """Cancel the job on the engine (the worker sends DELETE and reports the engine's answer)."""
        self._cancel.set()
        self._wake.set()

    def detach(self) -> None:
        """Stop following the job (Blender is closing or loading a file); the engine goes on with it."""
        self._detach.set()
        self._wake.set()

    def run(self) -> None:
        try:
            if self.submission:
                self.emit(Update(self.key, state="submitting", message="Sending the photo to the engine"))
                job = self.client.submit(**self.submission)
                self.job_id = str(job["id"])
                if self._detach.is_set():  # Blender went away while the photo was on its way: nobody could
                    self.client.cancel(self.job_id)  # ever fetch this job (its id reached no .blend)
                    return
                self.emit(Update.from_job(self.key, job))
            elif self.resume:
                self.emit(Update.from_job(self.key, self.client.resume(self.job_id)))
            self._follow()
        except EngineError as exc:
            self.emit(Update(self.key, state="failed", job_id=self.job_id, error=exc.as_dict(),
                                    message=exc.problem, submit_failed=not self.job_id))
        except Exception as exc:  # noqa: BLE001 - a bug must still reach the panel, not die in a thread
            self.emit(Update(self.key, state="failed", job_id=self.job_id, submit_failed=not self.job_id,
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
                    self.emit(Update(self.key, state="unreachable", job_id=self.job_id,
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
                self.emit(Update.from_job(self.key, job, **extra))
                return
            self.emit(Update.from_job(self.key, job, **extra))
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


FOLLOWER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "follower.py")
STALL_S = 600.0  # a job follower silent this long is stuck (it writes a line every poll): it is stopped


def python_executable() -> str:
    """A Python to run the follower with: Blender's own (`sys.executable` is its bundled Python)."""
    exe = sys.executable
    if not exe or not os.path.isfile(exe):
        raise EngineError(f"Blender's Python was not found (sys.executable is {exe!r}), so the add-on cannot "
                          "follow jobs.", "Reinstall Blender, or report this with your Blender version.",
                          kind="bug")
    return exe


def remove_file(path: str) -> None:
    """Remove `path` now, or (Windows: a follower still holds it open) once its follower has ended."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        LEFT_TO_REMOVE.add(path)


class FollowerProcess:
    """One `follower.py COMMAND` process and the file its stdout appends JSON lines to."""

    def __init__(self, command: str, spec: dict):
        handle, self.path = tempfile.mkstemp(prefix=f"realfusion-{command}-", suffix=".jsonl")
        os.close(handle)
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
        try:
            # append mode (O_APPEND): the follower's writes always land at the end of the file
            with open(self.path, "ab") as output:
                self.process = subprocess.Popen([python_executable(), "-I", FOLLOWER_SCRIPT, command],
                                                stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
                                                creationflags=flags)
            # the spec on stdin: the token never shows in a process list
            self.process.stdin.write((json.dumps(spec) + "\n").encode())
            self.process.stdin.flush()
        except EngineError:
            remove_file(self.path)
            raise
        except (OSError, ValueError) as exc:
            remove_file(self.path)
            raise EngineError(f"The add-on could not start its job follower ({exc}).",
                              "Try again; if it keeps failing, report it with the console output.",
                              kind="bug") from exc
        RUNNING.append(self)

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, command: str) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(f"{command}\n".encode())
            stdin.flush()
        except OSError:  # the follower has already ended
            pass

    def close_stdin(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def kill(self) -> None:
        if self.alive():
            self.process.kill()


RUNNING: list[FollowerProcess] = []  # followers not yet reaped
LEFT_TO_REMOVE: set[str] = set()  # files a follower still held when they were to go


def reap() -> None:
    """Wait for the followers that ended (no zombies), close their pipes and remove what they left."""
    for follower in list(RUNNING):
        if not follower.alive():
            follower.close_stdin()
            RUNNING.remove(follower)
    for path in list(LEFT_TO_REMOVE):
        LEFT_TO_REMOVE.discard(path)
        remove_file(path)


class LineReader:
    """The complete lines a follower appended to its output file since the last read (main thread)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.last_line = time.monotonic()

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        lines = [line.decode("utf-8", "replace") for line in lines if line.strip()]
        if lines:
            self.last_line = time.monotonic()
        return lines


class JobWorker:
    """One job followed by its own process (a `JobFollower` in follower.py), from Blender's main thread.

    `drain` returns the updates the follower wrote since the last call; `cancel` and `detach` send it a
    command. A follower that ends without saying how the job ended (killed, a crash, or silent for
    STALL_S and stopped) becomes a failed update that says so, so the panel never waits forever. Closing
    Blender closes the follower's stdin, which it takes as `detach`.
    """

    def __init__(self, client: EngineClient, key: str, folder: str, *, submission: dict | None = None,
                 job_id: str = "", resume: bool = False, poll_interval: float = 0.5):
        if not submission and not job_id:
            raise ValueError("a JobWorker needs a submission or the id of a job on the engine")
        self.key = key
        self.job_id = job_id
        self.submission = dict(submission or {})
        self.spec = {"url": client.base_url, "token": client.token, "timeout": client.timeout, "key": key,
                     "folder": folder, "job_id": job_id, "resume": resume, "poll_interval": poll_interval}
        self.follower: FollowerProcess | None = None
        self.reader: LineReader | None = None
        self.ended = False  # the follower said how the job ended (or we said it for a follower that died)
        self.detached = False

    def start(self) -> None:
        """Start the follower; raises EngineError (nothing left behind) when it cannot be started."""
        spec, photo = dict(self.spec), ""
        if "image_png" in self.submission:  # the photo goes by file: up to 50 MB would not fit a pipe's buffer
            handle, photo = tempfile.mkstemp(prefix="realfusion-photo-")
            with os.fdopen(handle, "wb") as f:
                f.write(self.submission["image_png"])
            spec["submission"] = {**{k: v for k, v in self.submission.items() if k != "image_png"},
                                  "image_path": photo}
        try:
            self.follower = FollowerProcess("follow", spec)
        except EngineError:
            if photo:
                remove_file(photo)
            raise
        self.reader = LineReader(self.follower.path)

    def is_alive(self) -> bool:
        return self.follower is not None and self.follower.alive()

    def cancel(self) -> None:
        """Cancel the job on the engine (the follower sends DELETE and reports the engine's answer)."""
        if self.follower is not None:
            self.follower.send("cancel")

    def detach(self) -> None:
        """Stop following the job (Blender is closing or loading a file); the engine goes on with it."""
        self.detached = True
        if self.follower is not None:
            self.follower.send("detach")
            self.follower.close_stdin()
            remove_file(self.follower.path)  # nobody reads it any more

    def drain(self) -> list[Update]:
        if self.reader is None:
            return []
        finished = not self.is_alive()  # before reading: whatever it wrote before it ended is read below
        updates = []
        for line in self.reader.read():
            try:
                update = Update.from_line(line)
            except (ValueError, TypeError):
                print(f"RealFusion: job follower: {line}")  # a traceback or a warning, not an update
                continue
            self.job_id = update.job_id or self.job_id
            self.ended = self.ended or update.state in TERMINAL_STATES + ("unreachable",) or update.submit_failed
            updates.append(update)
        if not finished and not self.ended and time.monotonic() - self.reader.last_line > STALL_S:
            self.follower.kill()  # stuck (a name lookup that never returns, a suspended process)
            self.follower.process.wait(5)
            finished = True
        if finished and not self.ended and not self.detached:
            self.ended = True
            code = self.follower.process.returncode
            fix = ("Press Check Again to follow the job on the engine again; if it keeps stopping, report it "
                   "with the console output." if self.job_id else "Press Reconstruct to send the photo again.")
            updates.append(Update(self.key, state="failed", job_id=self.job_id, submit_failed=not self.job_id,
                                  error={"problem": f"The add-on's job follower stopped (exit code {code}).",
                                         "fix": fix, "kind": "bug"}))
        if self.ended or finished:  # nothing more will come
            self.follower.close_stdin()
            remove_file(self.reader.path)
            reap()
        return updates

    def pending(self) -> bool:
        """Whether the follower may still have updates for `drain` (it runs, or its last lines are unread)."""
        return not self.ended and (self.is_alive() or (self.reader is not None and os.path.exists(self.reader.path)))


# Workers of this Blender session by job key. Module state on purpose: operators, panels and
# load handlers all reach the same ones, and none of them holds a `bpy` object.
WORKERS: dict[str, JobWorker] = {}


def detach_all() -> None:
    for worker in list(WORKERS.values()):
        worker.detach()
    WORKERS.clear()
    reap()


def running_followers() -> list[FollowerProcess]:
    """Follower processes of this session that still run (tests: nothing is left behind)."""
    reap()
    return list(RUNNING)
