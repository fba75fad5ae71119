"""A stand-in for `realfusion serve` (API v1) on loopback, standard library only.

It runs inside the Blender process of the add-on checks (a thread), or as a program
(`python fake_engine.py serve --port N`, how the engine launcher's check starts it).
Each GET of a job moves it one step along queued -> running -> done, so a test that
polls sees every state; `mode` picks a failure to act out.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESULTS = ("mesh.glb", "camera.json", "reference.png", "preview.png")


class FakeEngine:
    """modes: ok | fail (the job fails with an engine error) | reject (POST refused) | slow (never ends) |
    token (401 without `token`) | garbage (answers HTML) | crash (500 with no JSON body) |
    broken (the job ends well but its mesh.glb is not a GLB)."""

    def __init__(self, files_dir: str, mode: str = "ok", running_polls: int = 4, token: str = "secret",
                 host: str = "127.0.0.1", port: int = 0, submit_delay: float = 0.0):
        self.files_dir = files_dir
        self.submit_delay = submit_delay
        self.mode = mode
        self.running_polls = running_polls
        self.token = token
        self.jobs: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.submissions: list[dict] = []
        self.lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                engine.handle(self, "GET")

            def do_POST(self):
                engine.handle(self, "POST")

            def do_DELETE(self):
                engine.handle(self, "DELETE")

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeEngine":
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------

    def handle(self, request, method: str) -> None:
        path = request.path.split("?")[0]
        with self.lock:
            self.requests.append((method, path))
        if self.mode == "garbage":
            return self.send(request, 200, b"<html>not an engine</html>", "text/html")
        if self.mode == "crash":
            return self.send(request, 500, b"Internal Server Error", "text/plain")
        if self.mode == "token" and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self.error(request, 401, "The token is missing or wrong.", "Send the token from the token file.")
        parts = [p for p in path.split("/") if p]
        if method == "GET" and parts == ["health"]:
            return self.json(request, 200, {"ok": True, "version": "0.0-fake", "device": "cpu", "gpu": None,
                                            "methods": ["realfusion"], "presets": ["fast", "standard", "paper"],
                                            "model": "fake", "queue": 0})
        if method == "POST" and parts == ["jobs"]:
            return self.submit(request)
        if len(parts) >= 2 and parts[0] == "jobs":
            job = self.jobs.get(parts[1])
            if job is None:
                return self.error(request, 404, f"There is no job {parts[1]!r} on this server.",
                                  "List the jobs with GET /jobs.")
            if method == "GET" and len(parts) == 2:
                self.advance(job)
                return self.json(request, 200, self.public(job))
            if method == "POST" and parts[2:] == ["resume"]:
                if job["state"] not in ("failed", "cancelled", "interrupted"):
                    return self.error(request, 409, f"Job {job['id']} is {job['state']}.", "Wait for it.")
                self.mode = "ok"
                job.update(state="queued", polls=0, error=None, message="Queued again")
                return self.json(request, 200, self.public(job))
            if method == "DELETE" and len(parts) == 2:
                if job["state"] in ("queued", "running"):
                    job.update(state="cancelled", message="Cancelled; its last checkpoint is kept")
                return self.json(request, 200, self.public(job))
            if method == "GET" and len(parts) == 4 and parts[2] == "files":
                name = parts[3]
                file_path = os.path.join(self.files_dir, name)
                if name not in job["files"] or not os.path.isfile(file_path):
                    return self.error(request, 404, f"Job {job['id']} has no file {name!r}.", "See files.")
                if self.mode == "broken" and name == "mesh.glb":
                    return self.send(request, 200, b"glTF but not really", "model/gltf-binary")
                with open(file_path, "rb") as f:
                    return self.send(request, 200, f.read(), "application/octet-stream")
        return self.error(request, 404, "Not Found", "See GET /docs for the API.")

    def submit(self, request) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = json.loads(request.rfile.read(length))
        image = base64.b64decode(body["image_png_base64"])
        self.submissions.append({**{k: v for k, v in body.items() if k != "image_png_base64"}, "image": image})
        if self.mode == "reject":
            return self.error(request, 400, "No object found in the photo (the mask is empty).",
                              "Use a photo where the object stands out from the background.")
        job_id = f"job{len(self.jobs) + 1}"
        job = {"id": job_id, "state": "queued", "stage": "", "step": 0, "total": 0, "progress": 0.0,
               "message": "Waiting for its turn", "error": None, "files": {}, "metrics": {}, "polls": 0,
               "queue_position": 0}
        self.jobs[job_id] = job
        time.sleep(self.submit_delay)  # the job exists; its id is still on its way to the client
        self.json(request, 201, self.public(job))

    def advance(self, job: dict) -> None:
        if job["state"] not in ("queued", "running"):
            return
        job["polls"] += 1
        polls = job["polls"]
        if self.mode == "slow" or polls < self.running_polls + 2:
            step = min(max(polls - 1, 0), self.running_polls)
            job.update(state="running", stage="fit", step=step, total=self.running_polls,
                       progress=round(0.4 + 0.5 * step / self.running_polls, 3),
                       message=f"Fitting the 3D field ({step}/{self.running_polls})", queue_position=None)
            job["files"] = {"preview.png": f"/jobs/{job['id']}/files/preview.png"} if step else {}
            if self.mode == "fail" and polls >= 2:
                job.update(state="failed", message="CUDA out of memory.",
                           error={"problem": "The GPU ran out of memory (CUDA out of memory).",
                                  "fix": "Use the fast preset, or close other programs that use the GPU."})
            return
        job.update(state="done", stage="done", progress=1.0, message="Done",
                   files={name: f"/jobs/{job['id']}/files/{name}" for name in RESULTS})

    def public(self, job: dict) -> dict:
        out = {k: v for k, v in job.items() if k != "polls"}
        out["preview"] = job["files"].get("preview.png")
        return out

    # ------------------------------------------------------------------------------------------

    def json(self, request, status: int, data: dict) -> None:
        self.send(request, status, json.dumps(data).encode(), "application/json")

    def error(self, request, status: int, problem: str, fix: str) -> None:
        self.json(request, status, {"error": {"problem": problem, "fix": fix}})

    @staticmethod
    def send(request, status: int, body: bytes, content_type: str) -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def main(argv: list[str]) -> int:
    """`fake_engine.py serve --host H --port P [...]`: what the engine launcher runs in the checks."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model")
    parser.add_argument("--device")
    parser.add_argument("--data-dir", "--jobs-dir", dest="data_dir", default=".")
    args = parser.parse_args(argv)
    engine = FakeEngine(args.data_dir, host=args.host, port=args.port)
    print(f"fake engine listening on {engine.url} ({' '.join(argv)})", flush=True)
    engine.server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
