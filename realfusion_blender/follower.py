# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on's follower process: the HTTP side of a job (or one health check), outside Blender.

    python -I follower.py follow|health     (the spec: one JSON line on stdin)

`follow` runs a `JobFollower` and writes each `Update` as a JSON line to stdout; further stdin
lines are commands ("cancel", "detach"), and the end of stdin (Blender closed, or crashed) is
"detach": the engine goes on with the job. `health` writes one line, {"info"} or {"error"}.
Only the standard library and the add-on's `client` and `jobs` modules: this file is run by path
with `-I`, so it imports them as a package of their own, without the add-on's `__init__` (bpy).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import types

PACKAGE = "realfusion_follower"  # the add-on's folder as a package that never runs its __init__


def load(module: str):
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{module}")


def write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def listen(follower) -> None:
    """Commands from Blender until its end of the pipe closes."""
    for line in sys.stdin:
        command = line.strip()
        if command == "cancel":
            follower.cancel()
        elif command == "detach":
            break
    follower.detach()


def follow(spec: dict) -> None:
    client, jobs = load("client"), load("jobs")
    submission = spec.get("submission")
    if submission:  # the photo came by file (jobs.JobWorker); it is ours to remove once read
        submission = dict(submission)
        path = submission.pop("image_path")
        with open(path, "rb") as f:
            submission["image_png"] = f.read()
        os.remove(path)
    engine = client.EngineClient(spec["url"], token=spec.get("token", ""), timeout=spec.get("timeout", 10.0))
    follower = jobs.JobFollower(engine, spec["key"], spec["folder"], submission=submission,
                                job_id=spec.get("job_id", ""), resume=spec.get("resume", False),
                                poll_interval=spec.get("poll_interval", 0.5),
                                emit=lambda update: write(update.to_line()))
    threading.Thread(target=listen, args=(follower,), daemon=True).start()
    follower.run()


def health(spec: dict) -> None:
    client = load("client")
    engine = client.EngineClient(spec["url"], token=spec.get("token", ""), timeout=spec.get("timeout", 2.0))
    try:
        write(json.dumps({"info": engine.health()}))
    except client.EngineError as exc:
        write(json.dumps({"error": exc.as_dict()}))
    except Exception as exc:  # noqa: BLE001 - a bug must still reach the panel as an answer
        write(json.dumps({"error": {"problem": f"The health check failed: {type(exc).__name__}: {exc}",
                                    "fix": "Please report this with the console output.", "kind": "bug"}}))


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in ("follow", "health"):
        print("usage: follower.py follow|health  (the spec as one JSON line on stdin)", file=sys.stderr)
        return 2
    spec = json.loads(sys.stdin.readline() or "{}")
    (follow if command == "follow" else health)(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
