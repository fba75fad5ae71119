# SPDX-License-Identifier: GPL-3.0-or-later
"""Starting and stopping a local engine (`realfusion serve`) from Blender, and its health.

The engine runs in its own Python environment (torch, diffusers); Blender only starts it
as a separate process in its own session, so closing Blender does not stop a running
job: the next Blender session finds the engine still there and fetches the result.
No `bpy` here: the preferences' buttons and the panel call these functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from . import jobs
from .client import EngineClient, EngineError, host_port

LOG_NAME = "realfusion-engine.log"
TOKEN_FILE = "token"


def default_data_dir() -> str:
    """The engine's default data folder (its jobs and its token file), as `realfusion serve` computes it
    (engine.server.jobs.default_jobs_dir): $REALFUSION_DATA, $REALFUSION_JOBS or ~/.local/share/realfusion/jobs."""
    return os.environ.get("REALFUSION_DATA") or os.environ.get("REALFUSION_JOBS") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "realfusion", "jobs")


def token_path(data_dir: str = "") -> str:
    """Where the engine with this data folder (empty: the default) keeps its bearer token."""
    return os.path.join(data_dir or default_data_dir(), TOKEN_FILE)


def resolve_command(path: str) -> list[str]:
    """The argv prefix that runs the engine's CLI from what the user gave: a venv folder, its Python,
    or its `realfusion` command."""
    path = os.path.expanduser((path or "").strip())
    if not path:
        raise EngineError("No engine environment is set.",
                          "In Preferences > Add-ons > RealFusion, set Engine Environment to the Python of the "
                          "environment where the engine is installed (…/bin/python), then press Start engine.",
                          kind="input")
    if os.path.isdir(path):
        for relative in (("bin", "realfusion"), ("Scripts", "realfusion.exe"), ("bin", "python"),
                         ("Scripts", "python.exe")):
            candidate = os.path.join(path, *relative)
            if os.path.isfile(candidate):
                return resolve_command(candidate)
        raise EngineError(f"{path} holds no Python environment with the engine (no bin/realfusion, no bin/python).",
                          "Pick the folder of the virtual environment where `pip install -e .[engine,server]` "
                          "was run, or its bin/python.", kind="input")
    if not os.path.isfile(path):
        raise EngineError(f"The engine environment {path} does not exist.",
                          "Fix Engine Environment in the add-on's preferences.", kind="input")
    name = os.path.basename(path).lower()
    if name.startswith("python"):
        return [path, "-m", "engine.cli"]
    return [path]


def serve_command(path: str, url: str, model: str = "", device: str = "auto", data_dir: str = "") -> list[str]:
    """Always with --data-dir (empty: the default), so the add-on knows where the token file is."""
    host, port = host_port(url)
    command = resolve_command(path) + ["serve", "--host", host, "--port", str(port)]
    if model:
        command += ["--model", model]
    if device and device != "auto":
        command += ["--device", device]
    return command + ["--data-dir", data_dir or default_data_dir()]


class EngineProcess:
    """The engine this Blender session started, if any."""

    def __init__(self):
        self.popen: subprocess.Popen | None = None
        self.command: list[str] = []
        self.log_path = os.path.join(tempfile.gettempdir(), LOG_NAME)
        self.started = 0.0

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, command: list[str]) -> None:
        if self.running:
            return
        log = open(self.log_path, "ab")
        log.write(f"\n--- {time.ctime()}: {' '.join(command)}\n".encode())
        log.flush()
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | 0x00000008  # DETACHED_PROCESS
        else:
            kwargs["start_new_session"] = True  # outlives Blender, so a running job goes on
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name in ("PYTHONHOME", "PYTHONPATH"):  # Blender's own would break the engine's Python
            env.pop(name, None)
        try:
            self.popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, **kwargs)
        except OSError as exc:
            raise EngineError(f"Could not start the engine ({exc.strerror or exc}): {' '.join(command)}",
                              "Check Engine Environment in the add-on's preferences.", kind="input") from exc
        finally:
            log.close()
        self.command = command
        self.started = time.time()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the engine this session started (it marks a running job interrupted). False: none was running."""
        if not self.running:
            return False
        self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout)
        return True

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 5) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]


PROCESS = EngineProcess()


class Health:
    """The engine's last known health. `refresh_async` asks /health from a follower process (Blender runs no
    Python thread of ours, see jobs.py) and `collect` reads its answer on the main thread; the panel only reads
    `info` and `error`."""

    def __init__(self):
        self.info: dict | None = None
        self.error: EngineError | None = None
        self.checked = 0.0
        self.check = None  # the jobs.FollowerProcess of the check under way
        self.deadline = 0.0  # when that check is taken for stuck
        self.shown = 0.0  # when a panel last drew the engine's line (time.monotonic)

    def refresh(self, client: EngineClient) -> None:
        """Ask /health now (blocking: for a button the user pressed)."""
        try:
            info, error = client.health(), None
        except EngineError as exc:
            info, error = None, exc
        self.info, self.error, self.checked = info, error, time.time()

    def refresh_async(self, client: EngineClient) -> None:
        """Take the last check's answer if it came, and start another unless one is under way (main thread)."""
        self.collect()
        if self.check is None:
            try:
                self.check = jobs.FollowerProcess("health", {"url": client.base_url, "token": client.token,
                                                             "timeout": client.timeout})
            except EngineError as exc:
                self.info, self.error, self.checked = None, exc, time.time()
                return
            self.check.close_stdin()  # it reads only the spec
            self.deadline = time.monotonic() + 3 * client.timeout + 10.0

    def collect(self) -> bool:
        """Read the answer of a finished check (one that outlived its deadline is stopped); True if one came."""
        if self.check is None:
            return False
        if self.check.alive():
            if time.monotonic() < self.deadline:
                return False
            self.check.kill()  # stuck: a name lookup that never returns, a suspended process
            self.check.process.wait(5)
        check, self.check = self.check, None
        lines = jobs.LineReader(check.path).read()
        jobs.remove_file(check.path)
        jobs.reap()
        answer = next((a for a in map(_json_or_none, reversed(lines))
                       if isinstance(a, dict) and ("info" in a or "error" in a)), {})
        if "info" in answer:
            self.info, self.error = answer["info"], None
        else:
            error = answer.get("error") or {"problem": f"The engine health check stopped (exit code "
                                                       f"{check.process.returncode}).", "fix": "", "kind": "bug"}
            self.info = None
            self.error = EngineError(error.get("problem", ""), error.get("fix", ""), kind=error.get("kind", "engine"))
        self.checked = time.time()
        return True

    def stop(self) -> None:
        """The add-on is being disabled: no check outlives it."""
        if self.check is not None:
            self.check.kill()
            jobs.remove_file(self.check.path)
            self.check = None
            jobs.reap()

    def summary(self) -> str:
        if self.info:
            device = self.info.get("gpu") or self.info.get("device", "?")
            queue = self.info.get("queue", 0)
            text = f"Engine on {device}"  # short: the sidebar is narrow (the version: Status, preferences)
            return text + (f", {queue} queued" if queue else "")
        if self.error is not None:
            return "Engine not reachable" if self.error.kind == "offline" else "Engine error"
        return "Engine not checked yet"


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


HEALTH = Health()


def describe() -> str:
    """Lines for the preferences: what the engine started here is doing."""
    if PROCESS.popen is None:
        return "No engine started from this Blender session."
    code = PROCESS.exit_code()
    if code is None:
        return f"Engine running (pid {PROCESS.popen.pid}); log: {PROCESS.log_path}"
    tail = PROCESS.log_tail(3)
    return "\n".join([f"Engine exited with code {code}; log: {PROCESS.log_path}", *tail])
