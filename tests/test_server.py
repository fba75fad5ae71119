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
import urllib.parse
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

    def __init__(self, jobs_dir: Path, model: Path, cache_dir: Path, log: Path, dir_flag: str = "--data-dir",
                 extra: tuple[str, ...] = ()):
        self.jobs_dir, self.log, self.model = jobs_dir, log, model
        self._log_start = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
        # One thread: on a small shared CI machine, OpenMP's spinning threads slow torch down many times over.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--port", "0", dir_flag, str(jobs_dir),
                 "--model", str(model), "--device", "cpu", "--cache-dir", str(cache_dir), *extra],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.port = self._wait_for_port()
        self.token = (jobs_dir / "token").read_text().strip()  # written before the server listens
        self.auth = {"Authorization": f"Bearer {self.token}"}

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

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0, token: str | None = None):
        """(status, parsed JSON) over urllib, as the add-on does it; token "" sends none."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        token = self.token if token is None else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def raw_get(self, path: str):
        """GET with the path sent exactly as written (no client-side normalization): (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path, headers=self.auth)
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
    # Small upload limits, so the limit tests need no big uploads (the test photo is far under both).
    srv = Server(root / "jobs", tiny_sd_dir, embedding_cache, root / "server.log",
                 extra=("--max-upload-mb", "1", "--max-megapixels", "1"))
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
    assert health["methods"] == ["realfusion", "conrad"] and health["presets"] == ["fast", "standard", "paper"]
    assert health["model"] == str(tiny_sd_dir) and isinstance(health["queue"], int)
    assert [(w["device"], w["gpu"]) for w in health["workers"]] == [("cpu", None)]  # --device cpu: one worker


def test_job_runs_to_done_and_serves_its_results(server, done_job):
    job = done_job
    assert job["state"] == "done", job
    assert job["progress"] == 1.0 and job["error"] is None and job["stage"] == "done"
    assert job["device"] == "cpu"  # the worker that ran it
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


def test_a_conrad_job_runs_to_done(server, photo_b64, done_job):
    status, job = server.call("POST", "/jobs", job_request(photo_b64, method="conrad"))
    assert status == 201 and job["settings"]["method"] == "conrad", job
    job = server.wait(job["id"], timeout=120)
    assert job["state"] == "done", f"{job}\n{server.log_tail()}"
    assert {"field.pt", "turntable.png"} <= set(job["files"])


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
        conn.request("GET", "/jobs", headers={"Host": "attacker.example", **server.auth})
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
                     b"Authorization: Bearer %s\r\n" % server.token.encode() +
                     b"Content-Length: 100000\r\n\r\n{\"image_png_base64\": \"iVBOR")
    # 2. a complete submission whose client hangs up without reading the answer still runs
    body = json.dumps(job_request(photo_b64, filename="hung-up.png")).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\n" % server.token.encode() +
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 30
    while not (mine := [j for j in server.call("GET", "/jobs")[1]["jobs"]
                        if j["settings"]["filename"] == "hung-up.png"]):
        assert time.monotonic() < deadline, "the submission never arrived"
        time.sleep(0.1)
    job_id = mine[0]["id"]
    assert len(set(server.jobs_dir.iterdir()) - set(before)) == 1
    # 3. an event stream closed after its first event does not stop it either
    events = urllib.request.Request(f"http://127.0.0.1:{server.port}/jobs/{job_id}/events", headers=server.auth)
    with urllib.request.urlopen(events, timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.readline().startswith(b"event: job")
        assert json.loads(stream.readline().removeprefix(b"data: "))["id"] == job_id

    assert server.wait(job_id)["state"] == "done"
    assert server.call("GET", "/health")[0] == 200


def test_killed_server_leaves_the_job_interrupted_and_resume_finishes_it(tmp_path, tiny_sd_dir, photo_b64,
                                                                         embedding_cache, done_job):
    jobs = tmp_path / "jobs"
    first = Server(jobs, tiny_sd_dir, embedding_cache, tmp_path / "server.log", dir_flag="--jobs-dir")  # old name
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


# ---------------------------------------------------------------------------------------------- security, limits, load

def test_every_request_needs_the_token_from_the_user_only_token_file(server):
    token_file = server.jobs_dir / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(server.token) >= 32
    for path in ("/health", "/jobs", "/jobs/nope", "/jobs/nope/events", "/jobs/nope/files/preview.png"):
        for token in ("", "wrong", server.token + "x"):
            status, body = server.call("GET", path, token=token)
            assert status == 401, (path, token, body)
            assert str(token_file) in body["error"]["fix"] and body["error"]["problem"], body
    status, body = server.call("POST", "/jobs", {"image_png_base64": "x"}, token="wrong")
    assert status == 401 and not [p for p in server.jobs_dir.iterdir() if p.is_dir() and p.name == "x"]
    assert server.call("GET", "/health")[0] == 200  # the right token
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/openapi.json", timeout=30) as schema:
        assert "/jobs/{job_id}" in json.loads(schema.read())["paths"]  # the docs need no token


def test_uploads_over_the_byte_or_pixel_limit_are_refused(server, photo_b64):
    before = sorted(server.jobs_dir.iterdir())
    too_many_bytes = base64.b64encode(os.urandom(1200 * 1024)).decode()  # the server takes 1 MiB here
    status, body = server.call("POST", "/jobs", job_request(too_many_bytes))
    assert status == 413 and "MiB" in body["error"]["problem"] and "--max-upload-mb" in body["error"]["fix"]

    buffer = io.BytesIO()
    Image.new("RGB", (1100, 1000), (200, 40, 40)).save(buffer, format="PNG")  # 1.1 Mpx in a few KiB
    status, body = server.call("POST", "/jobs", job_request(base64.b64encode(buffer.getvalue()).decode()))
    assert status == 413 and "1100x1000" in body["error"]["problem"] and body["error"]["fix"], body

    # a body announced as too big is refused before it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nContent-Length: 10000000000\r\n\r\n{" % server.token.encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sorted(server.jobs_dir.iterdir()) == before and server.call("GET", "/health")[0] == 200


def test_three_concurrent_submissions_queue_and_finish_in_order_with_the_model_loaded_once(server, photo_b64,
                                                                                           done_job):
    import threading

    barrier, results = threading.Barrier(3), [None] * 3

    def submit(i):
        barrier.wait()
        results[i] = server.call("POST", "/jobs", job_request(photo_b64, filename=f"concurrent-{i}.png"))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [status for status, _ in results] == [201] * 3, results
    ids = [job["id"] for _, job in sorted(results, key=lambda r: r[1]["created"])]  # "created" is queue order
    assert len(set(ids)) == 3
    jobs = [server.wait(job_id) for job_id in ids]
    assert [job["state"] for job in jobs] == ["done"] * 3, jobs
    # one at a time, in the queue's order: each started (config.json) after the one before finished
    spans = [((server.jobs_dir / i / "config.json").stat().st_mtime,
              (server.jobs_dir / i / "status.json").stat().st_mtime) for i in ids]
    assert all(spans[k][1] <= spans[k + 1][0] for k in range(2)), spans

    status, health = server.call("GET", "/health")
    assert status == 200 and health["model_loaded"] is True and health["loaded_model"] == str(server.model)
    assert health["model_loads"] == 1, health  # every job here (done_job and these three) took the same model
    assert health["gpu_memory"] is None  # CPU
    [worker] = health["workers"]
    assert {k: worker[k] for k in ("device", "gpu", "running", "model_loaded", "model_loads", "gpu_memory")} == {
        "device": "cpu", "gpu": None, "running": None, "model_loaded": str(server.model), "model_loads": 1,
        "gpu_memory": None}
    assert worker["pid"] == server.proc.pid and worker["memory_bytes"] > 10 * 2**20  # the server's own process


def test_fuzzed_requests_never_get_a_5xx_nor_stop_the_server(server, done_job):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(), inner, max_size=4), max_leaves=8)
    fields = st.fixed_dictionaries({}, optional={
        "image_png_base64": st.text(max_size=40) | st.just(base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()),
        "filename": json_values, "preset": st.sampled_from(["fast", "ultra", ""]) | json_values,
        "method": json_values, "seed": json_values, "model": json_values, "overrides": json_values})
    bodies = (json_values.map(lambda v: json.dumps(v).encode()) | fields.map(lambda v: json.dumps(v).encode())
              | st.binary(max_size=200) | st.none())
    segment = st.text(max_size=12).map(lambda t: urllib.parse.quote(t, safe="%.~"))
    paths = st.one_of(
        st.sampled_from(["/health", "/jobs", "/docs", "/openapi.json"]),
        st.builds(lambda a: f"/jobs/{a}", segment | st.just(done_job["id"])),
        st.builds(lambda a, b: f"/jobs/{a}/{b}", segment | st.just(done_job["id"]),
                  st.sampled_from(["files", "resume", "events"]) | segment),
        st.builds(lambda a, b: f"/jobs/{a}/files/{b}", st.just(done_job["id"]) | segment, segment),
        st.lists(segment, max_size=4).map(lambda parts: "/" + "/".join(parts)))
    seen = []

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), path=paths, body=bodies,
           content_type=st.sampled_from(["application/json", "text/plain", None]))
    def request_is_answered_without_5xx(method, path, body, content_type):
        if path.endswith("/events") and method == "GET" and done_job["id"] in path:
            return  # a finished job's stream ends after one event, but a live one would not
        if method == "DELETE" and path.strip("/").count("/") == 1 and done_job["id"] in path:
            return  # cancelling the finished job is harmless, but keep it out of the way
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            headers = dict(server.auth)
            if content_type:
                headers["Content-Type"] = content_type
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        seen.append(response.status)
        assert response.status < 500, (method, path, body, response.status)

    request_is_answered_without_5xx()
    assert len(seen) >= 50 and server.proc.poll() is None and server.call("GET", "/health")[0] == 200
    queued = [j for j in server.call("GET", "/jobs")[1]["jobs"] if j["state"] in ("queued", "running")]
    assert not queued, queued  # no fuzzed request made a job


def test_keep_alive_answers_are_not_held_back_by_nagle(server):
    from engine.server.app import _listen

    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # so asyncio sets TCP_NODELAY on every accepted connection
    finally:
        sock.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        start = time.monotonic()
        for _ in range(20):  # with Nagle + delayed ACKs each of these took ~45 ms
            conn.request("GET", "/health", headers=server.auth)
            assert conn.getresponse().read()
        assert time.monotonic() - start < 0.6
    finally:
        conn.close()
