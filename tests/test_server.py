"""`realfusion serve` as the Blender add-on sees it: a separate process, real HTTP on 127.0.0.1, urllib.

The server runs the real pipeline with the tiny Stable Diffusion from disk (`--model`),
so every job here goes through matting, textual inversion, the fit and the turntable.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import engine
from synthetic_images import rgba_disc
from test_cli import TINY

REPO = Path(__file__).resolve().parents[1]
LONG_FIT = ["fit.iterations=100000", "fit.checkpoint_every=2", "fit.preview_every=100000"]


class Server:
    """`python -m engine.cli serve --port 0 ...` in its own process; the port comes from its first line."""

    def __init__(self, jobs_dir: Path, model: Path, cache_dir: Path, log: Path):
        self.jobs_dir, self.log = jobs_dir, log
        self._log_start = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
        # One thread: on a small shared CI machine, OpenMP's spinning threads slow torch down many times over.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--jobs-dir", str(jobs_dir),
                 "--model", str(model), "--device", "cpu", "--cache-dir", str(cache_dir)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read_text()[self._log_start:])
            if found:
                return int(found[1])
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"the server did not start:\n{self.log.read_text()}")

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0):
        """(status, parsed JSON) over urllib, as the add-on does it."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def raw_get(self, path: str):
        """GET with the path sent exactly as written (no client-side normalization): (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def wait(self, job_id: str, done=lambda job: job["state"] not in ("queued", "running"), timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            status, job = self.call("GET", f"/jobs/{job_id}")
            assert status == 200, job
            if done(job):
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {job['state']} after {timeout} s: {job}\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown handler runs, like a crash or a closed terminal
        self.proc.wait()


def job_request(image_b64: str, overrides=(), **fields) -> dict:
    return {"image_png_base64": image_b64, "filename": "disc.png", "preset": "fast", "seed": 0,
            "overrides": [*TINY, *overrides], **fields}


@pytest.fixture(scope="module")
def photo_b64(tmp_path_factory) -> str:
    path = rgba_disc(tmp_path_factory.mktemp("photo") / "disc.png")
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def embedding_cache(tmp_path_factory) -> Path:
    """Shared by every server here, so textual inversion runs once and later jobs take the cached token."""
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sd_dir, embedding_cache):
    root = tmp_path_factory.mktemp("server")
    srv = Server(root / "jobs", tiny_sd_dir, embedding_cache, root / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def done_job(server, photo_b64):
    status, job = server.call("POST", "/jobs", job_request(photo_b64))
    assert status == 201, job
    assert job["state"] == "queued" and job["error"] is None
    return server.wait(job["id"])


def test_health_describes_the_engine(server, tiny_sd_dir):
    status, health = server.call("GET", "/health")
    assert status == 200
    assert health["ok"] is True and health["version"] == engine.__version__
    assert health["device"] == "cpu" and health["gpu"] is None
    assert health["methods"] == ["realfusion"] and health["presets"] == ["fast", "standard", "paper"]
    assert health["model"] == str(tiny_sd_dir) and isinstance(health["queue"], int)


def test_job_runs_to_done_and_serves_its_results(server, done_job):
    job = done_job
    assert job["state"] == "done", job
    assert job["progress"] == 1.0 and job["error"] is None and job["stage"] == "done"
    assert set(job["metrics"]) >= {"total", "sds", "image", "mask"}
    assert job["preview"] == f"/jobs/{job['id']}/files/preview.png"
    assert set(job["files"]) >= {"input.png", "reference.png", "preview.png", "turntable.png", "field.pt"}
    assert job["settings"]["preset"] == "fast" and job["settings"]["overrides"] == TINY

    status, headers, body = server.raw_get(job["preview"])
    assert status == 200 and headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(body)).size == (4 * 24, 2 * 24)  # 4 views, color over normals

    status, headers, body = server.raw_get(f"/jobs/{job['id']}/files/status.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["state"] == "done" and json.loads(body)["steps"] == 6

    status, listing = server.call("GET", "/jobs")
    assert status == 200 and job["id"] in [j["id"] for j in listing["jobs"]]
    created = [j["created"] for j in listing["jobs"]]
    assert created == sorted(created, reverse=True)  # newest first

    status, refused = server.call("POST", f"/jobs/{job['id']}/resume")
    assert status == 409 and refused["error"]["fix"]


@pytest.mark.parametrize("change, status, words", [
    ({"image_png_base64": "not base64!"}, 400, "base64"),
    ({"image_png_base64": base64.b64encode(b"not a png").decode()}, 400, "could not be read"),
    ("tiny", 400, "20x20"),
    ({"preset": "ultra"}, 422, "preset"),
    ({"method": "zero123"}, 422, "method"),
    ({"overrides": ["fit.iters=3"]}, 400, "fit.iters"),
])
def test_bad_requests_are_refused_with_problem_and_fix(server, photo_b64, change, status, words):
    if change == "tiny":
        buffer = io.BytesIO()
        Image.new("RGBA", (20, 20), (255, 0, 0, 255)).save(buffer, format="PNG")
        change = {"image_png_base64": base64.b64encode(buffer.getvalue()).decode()}
    before = sorted(server.jobs_dir.iterdir())
    got, body = server.call("POST", "/jobs", {**job_request(photo_b64), **change})
    assert got == status, body
    assert words in body["error"]["problem"] and body["error"]["fix"]
    assert sorted(server.jobs_dir.iterdir()) == before  # a refused upload leaves no job behind


def test_unknown_job_is_404_with_problem_and_fix(server):
    for method, path in (("GET", "/jobs/nope"), ("DELETE", "/jobs/nope"), ("POST", "/jobs/nope/resume"),
                         ("GET", "/jobs/nope/files/preview.png")):
        status, body = server.call(method, path)
        assert status == 404 and body["error"]["problem"] and body["error"]["fix"], (method, path, body)


def test_files_outside_the_job_folder_are_refused(server, done_job):
    secret = "top secret"
    (server.jobs_dir / "secret.txt").write_text(secret)
    (server.jobs_dir.parent / "secret.txt").write_text(secret)
    job_dir = server.jobs_dir / done_job["id"]
    (job_dir / "link.txt").symlink_to(server.jobs_dir / "secret.txt")
    files = f"/jobs/{done_job['id']}/files/"
    for path in (files + "../secret.txt", files + "../../secret.txt", files + "%2e%2e/secret.txt",
                 files + "..%2fsecret.txt", files + "%2e%2e%2f%2e%2e%2fsecret.txt", files + "link.txt",
                 files + "%2fetc%2fpasswd", files + "/etc/passwd", files, files + ".", files + "previews",
                 f"/jobs/..%2f/files/secret.txt", f"/jobs/%2e%2e/files/secret.txt"):
        status, _headers, body = server.raw_get(path)
        assert status in (400, 404), (path, status, body)
        assert secret.encode() not in body and b"root:" not in body, path
    assert server.raw_get(files + "reference.png")[0] == 200  # while files inside are served


def test_requests_addressed_to_another_host_name_are_refused(server):
    # A web page that rebinds its own name to 127.0.0.1 sends its name in Host: the server must not answer it.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/jobs", headers={"Host": "attacker.example"})
        assert conn.getresponse().status == 400
    finally:
        conn.close()
    assert server.raw_get("/health")[0] == 200


def test_cancel_leaves_the_queue_or_stops_the_fit_keeping_its_checkpoint(server, photo_b64, done_job):
    status, long_job = server.call("POST", "/jobs", job_request(photo_b64, LONG_FIT))
    assert status == 201
    status, waiting = server.call("POST", "/jobs", job_request(photo_b64))
    assert status == 201

    status, cancelled = server.call("DELETE", f"/jobs/{waiting['id']}")  # still queued behind the long job
    assert status == 200 and cancelled["state"] == "cancelled" and cancelled["queue_position"] is None

    checkpoint = server.jobs_dir / long_job["id"] / "checkpoints" / "last.pt"
    server.wait(long_job["id"], lambda job: job["stage"] == "fit" and job["step"] >= 3 or job["state"] != "running")
    assert checkpoint.is_file()
    status, _ = server.call("DELETE", f"/jobs/{long_job['id']}")
    assert status == 200
    job = server.wait(long_job["id"], timeout=30)
    assert job["state"] == "cancelled" and job["error"] is None, job
    assert job["step"] < 100000 and checkpoint.is_file()
    assert json.loads((checkpoint.parents[1] / "status.json").read_text())["state"] == "cancelled"
    assert server.call("GET", f"/jobs/{waiting['id']}")[1]["state"] == "cancelled"  # it never ran


def test_a_client_that_goes_away_does_not_stop_the_job(server, photo_b64, done_job):
    # 1. an upload cut off half way creates nothing and leaves the server answering
    before = sorted(server.jobs_dir.iterdir())
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"image_png_base64\": \"iVBOR")
    # 2. a complete submission whose client hangs up without reading the answer still runs
    body = json.dumps(job_request(photo_b64, filename="hung-up.png")).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 30
    while not (mine := [j for j in server.call("GET", "/jobs")[1]["jobs"]
                        if j["settings"]["filename"] == "hung-up.png"]):
        assert time.monotonic() < deadline, "the submission never arrived"
        time.sleep(0.1)
    job_id = mine[0]["id"]
    assert len(set(server.jobs_dir.iterdir()) - set(before)) == 1
    # 3. an event stream closed after its first event does not stop it either
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/jobs/{job_id}/events", timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.readline().startswith(b"event: job")
        assert json.loads(stream.readline().removeprefix(b"data: "))["id"] == job_id

    assert server.wait(job_id)["state"] == "done"
    assert server.call("GET", "/health")[0] == 200


def test_killed_server_leaves_the_job_interrupted_and_resume_finishes_it(tmp_path, tiny_sd_dir, photo_b64,
                                                                         embedding_cache, done_job):
    jobs = tmp_path / "jobs"
    first = Server(jobs, tiny_sd_dir, embedding_cache, tmp_path / "server.log")
    try:
        overrides = ["fit.iterations=10", "fit.checkpoint_every=2", "fit.preview_every=4"]
        status, job = first.call("POST", "/jobs", job_request(photo_b64, overrides))
        assert status == 201
        first.wait(job["id"], lambda j: j["stage"] == "fit" and j["step"] >= 5 or j["state"] != "running")
    finally:
        first.kill()
    killed_at = time.time()
    early_preview = jobs / job["id"] / "previews" / "step_000004.png"  # written with the checkpoint at step 4
    assert early_preview.is_file()

    second = Server(jobs, tiny_sd_dir, embedding_cache, tmp_path / "server.log")
    try:
        status, listed = second.call("GET", f"/jobs/{job['id']}")
        assert status == 200 and listed["state"] == "interrupted", listed
        assert json.loads((jobs / job["id"] / "status.json").read_text())["state"] == "interrupted"
        status, resumed = second.call("POST", f"/jobs/{job['id']}/resume")
        assert status == 200 and resumed["state"] in ("queued", "running")
        finished = second.wait(job["id"])
        assert finished["state"] == "done", finished
        status_file = json.loads((jobs / job["id"] / "status.json").read_text())
        assert status_file["state"] == "done" and status_file["steps"] == 10
        assert early_preview.stat().st_mtime < killed_at  # went on from the checkpoint, not from step 0
    finally:
        second.stop()
