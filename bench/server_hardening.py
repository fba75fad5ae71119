"""`realfusion serve` attacked as in issue 15 (CPU, tiny model), answers recorded in
bench/results/server_hardening.json. A measurement, not a test (tests/test_server_hardening.py checks):

    python bench/server_hardening.py [--kills 6] [--out bench/results/server_hardening.json]

Records: every attack tried and the server's answer; jobs surviving kill -9 at random moments (each comes
back interrupted or done and a resume finishes it); the server's memory and open files before/after 2000
requests; /health latency under 50 event-stream clients plus one job with the largest request the API
takes; memory under 8 concurrent maximum-size uploads; cancel and SIGTERM latency. Run as root it also
fills a small tmpfs to show the full-disk answers.
"""

from __future__ import annotations

import argparse
import base64
import errno
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from server_load import run_concurrently  # noqa: E402
from synthetic_images import rgba_disc  # noqa: E402
from test_cli import TINY  # noqa: E402
from tiny_sd import build_tiny_stable_diffusion  # noqa: E402

from engine.server.schemas import MAX_FILENAME_CHARS, MAX_OVERRIDE_CHARS, MAX_OVERRIDES  # noqa: E402


class Srv:
    """One `realfusion serve` process on a loopback port (0: a free one)."""

    def __init__(self, data: Path, model: Path, cache: Path, log: Path, *extra: str):
        self.data, self.log = data, log
        start = log.stat().st_size if log.exists() else 0
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--data-dir",
                                          str(data), "--model", str(model), "--device", "cpu", "--cache-dir",
                                          str(cache), *extra], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while not (found := re.search(r"listening on http://(\S+):(\d+) ",
                                      log.read_bytes()[start:].decode(errors="replace"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.1)
        self.host, self.port = found[1].strip("[]"), int(found[2])
        self.token = (data / "token").read_text().strip()

    def call(self, method, path, body=None, headers=None, raw: bytes | None = None, timeout=60):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            h = {"Authorization": f"Bearer {self.token}", **(headers or {})}
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            if data is not None and "Content-Type" not in h:
                h["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=h)
            response = conn.getresponse()
            text = response.read()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text[:200].decode(errors="replace")
        finally:
            conn.close()

    def wait(self, job_id, done=lambda j: j["state"] not in ("queued", "running"), timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.call("GET", f"/jobs/{job_id}")
            if status == 200 and done(job):
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id}: {job}")

    def rss_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmRSS") / 1024

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, sig=signal.SIGTERM) -> float:
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - start


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def answer(status, body) -> dict:
    error = body.get("error") if isinstance(body, dict) else None
    return {"status": status, "problem": error["problem"][:200] if error else None,
            "fix": error["fix"][:160] if error else None}


def request(photo, overrides=(), **fields) -> dict:
    return {"image_png_base64": photo, "filename": "disc.png", "preset": "fast", "overrides": [*TINY, *overrides],
            **fields}


def attacks(srv: Srv, photo: str, model: Path, tmp: Path) -> list[dict]:
    out = []

    def record(name, status, body):
        out.append({"attack": name, **answer(status, body)})

    record("no token", *srv.call("GET", "/jobs", headers={"Authorization": ""}))
    record("wrong token", *srv.call("GET", "/jobs", headers={"Authorization": "Bearer nope"}))
    record("lower-case 'bearer' scheme (allowed)", *srv.call("GET", "/health",
                                                             headers={"Authorization": f"bearer {srv.token}"}))
    record("Host: evil.example (DNS rebinding)", *srv.call("GET", "/jobs", headers={"Host": "evil.example"}))
    record("Host: [::1]:PORT on a 127.0.0.1 bind (allowed)", *srv.call("GET", "/health",
                                                                        headers={"Host": f"[::1]:{srv.port}"}))
    record("path traversal ../../token", *srv.call("GET", "/jobs/x/files/..%2f..%2ftoken"))
    for overrides in (["seed=1180591620717411303424"], ['fit.betas=["a","b"]'], ["field.backend=evil"],
                      ["textual_inversion.prompt=a photo"], ["render.step_size=0"], ["fit.checkpoint_every=0"],
                      ["prior.dtype=int3"], ["export.format=exe"], ["export.resolution=-1"], ["fit.iterations=0"],
                      ["fit.iterations=-5"], ["method=zero123"], ["render.background=pink"],
                      ["prior.weighting=cubic"], ["fit.learning_rate=NaN"]):
        record(f"override {overrides[0]}", *srv.call("POST", "/jobs", request(photo, overrides)))
    record("seed 2**70", *srv.call("POST", "/jobs", request(photo, seed=2**70)))
    extra = ["fit.iterations=7"] * (MAX_OVERRIDES + 1 - len(TINY))
    record(f"{MAX_OVERRIDES + 1} overrides", *srv.call("POST", "/jobs", request(photo, extra)))
    record("50000 overrides", *srv.call("POST", "/jobs", request(photo, ["fit.iterations=7"] * 50000)))
    record(f"override of {MAX_OVERRIDE_CHARS + 1} chars",
           *srv.call("POST", "/jobs", request(photo, ["textual_inversion.prompt=" + "x" * MAX_OVERRIDE_CHARS])))
    record(f"filename of {MAX_FILENAME_CHARS + 1} chars",
           *srv.call("POST", "/jobs", request(photo, filename="a" * (MAX_FILENAME_CHARS + 1))))
    record("initializer 'two words'", *srv.call("POST", "/jobs", request(photo, initializer="two words")))
    record("Content-Length: 10**10", *_raw(srv, b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                                               b"Bearer %s\r\nContent-Length: 10000000000\r\n\r\n{"
                                               % srv.token.encode()))
    record("chunked body past the limit", *_chunked(srv, 80 * 2**20))
    start = time.monotonic()
    with socket.create_connection((srv.host, srv.port), timeout=60) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = sock.recv(10) == b""
    out.append({"attack": "partial header, then silence", "closed_by_server": closed,
                "seconds_to_close": round(time.monotonic() - start, 1)})
    return out


def _raw(srv: Srv, data: bytes):
    with socket.create_connection((srv.host, srv.port), timeout=60) as sock:
        sock.sendall(data)
        return _read_answer(sock)


def _chunked(srv: Srv, total: int):
    with socket.create_connection((srv.host, srv.port), timeout=60) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAuthorization: "
                     b"Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n" % srv.token.encode())
        chunk = b"x" * 2**20
        try:
            for _ in range(total // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        return _read_answer(sock)


def _read_answer(sock):
    data = b""
    try:
        while part := sock.recv(65536):
            data += part
    except (ConnectionResetError, socket.timeout):
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body[:200].decode(errors="replace")


def second_server(srv: Srv, model: Path, photo: str) -> dict:
    status, job = srv.call("POST", "/jobs", request(photo, ["fit.iterations=100000", "fit.preview_every=100000"]))
    srv.wait(job["id"], lambda j: j["stage"] == "fit" or j["state"] != "running")
    record = (srv.data / job["id"] / "job.json").read_bytes()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--data-dir", str(srv.data),
                           "--model", str(model), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    unchanged = (srv.data / job["id"] / "job.json").read_bytes() == record
    state = srv.call("GET", f"/jobs/{job['id']}")[1]["state"]
    start = time.monotonic()
    srv.call("DELETE", f"/jobs/{job['id']}")
    cancelled = srv.wait(job["id"])
    return {"attack": "second `serve` on the same data dir while a job runs", "exit_code": done.returncode,
            "message": done.stderr.strip().splitlines()[-1][:300], "running_job_record_unchanged": unchanged,
            "running_job_state_after": state, "cancel_of_a_fitting_job_s": round(time.monotonic() - start, 2),
            "cancelled_state": cancelled["state"]}


def cancel_and_sigterm(tmp: Path, model: Path, photo: str) -> dict:
    """Cancel and SIGTERM inside a textual-inversion step, on a server that has loaded its model (loading it,
    diffusers' from_pretrained, is the one part a cancel cannot cut short: it takes effect once loading ends)."""
    data, log = tmp / "cancel-data", tmp / "cancel.log"
    srv = Srv(data, model, tmp / "cache-cancel", log)
    srv.wait(srv.call("POST", "/jobs", request(photo))[1]["id"])  # loads the model
    long_ti = ["textual_inversion.steps=1000", "textual_inversion.grad_accumulation=64",
               "textual_inversion.resolution=64", "textual_inversion.cache=false"]
    status, job = srv.call("POST", "/jobs", request(photo, long_ti))
    srv.wait(job["id"], lambda j: j["stage"] in ("prior", "textual_inversion"))
    time.sleep(2.0)
    start = time.monotonic()
    srv.call("DELETE", f"/jobs/{job['id']}")
    cancelled = srv.wait(job["id"])
    ti_cancel_s = time.monotonic() - start
    status, second = srv.call("POST", "/jobs", request(photo, long_ti))
    srv.wait(second["id"], lambda j: j["stage"] in ("prior", "textual_inversion"))
    time.sleep(2.0)
    srv.call("DELETE", f"/jobs/{second['id']}")  # cancelled, then the server is stopped at once
    sigterm_s = srv.stop()
    srv = Srv(data, model, tmp / "cache-cancel", log)
    after = srv.call("GET", f"/jobs/{second['id']}")[1]["state"]
    srv.wait(srv.call("POST", "/jobs", request(photo))[1]["id"])  # loads the model
    status, third = srv.call("POST", "/jobs", request(photo, long_ti))
    srv.wait(third["id"], lambda j: j["stage"] in ("prior", "textual_inversion"))
    time.sleep(2.0)
    sigterm_running_s = srv.stop()
    srv = Srv(data, model, tmp / "cache-cancel", log)
    third_after = srv.call("GET", f"/jobs/{third['id']}")[1]["state"]
    srv.stop()
    return {"cancel_inside_a_textual_inversion_step_s": round(ti_cancel_s, 2), "state": cancelled["state"],
            "textual_inversion_step_s_note": "one step of 64 micro-batches at 64 px takes about 17 s on this CPU",
            "sigterm_right_after_cancel_s": round(sigterm_s, 2), "that_job_after_restart": after,
            "sigterm_with_a_running_job_s": round(sigterm_running_s, 2), "running_job_after_restart": third_after}


def kill9(tmp: Path, model: Path, photo: str, kills: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    data, log = tmp / "kill-data", tmp / "kill.log"
    overrides = ["fit.iterations=30", "fit.checkpoint_every=2", "fit.preview_every=10"]
    outcomes = []
    for i in range(kills):
        srv = Srv(data, model, tmp / "cache-kill", log)
        status, job = srv.call("POST", "/jobs", request(photo, overrides))
        delay = (i + rng.random()) * 20.0 / kills  # spread over the job's ~20 s here, so every stage is hit
        time.sleep(delay)
        stage = srv.call("GET", f"/jobs/{job['id']}")[1]
        srv.stop(signal.SIGKILL)
        srv = Srv(data, model, tmp / "cache-kill", log)
        back = srv.call("GET", f"/jobs/{job['id']}")[1]
        if back["state"] == "interrupted":
            srv.call("POST", f"/jobs/{job['id']}/resume")
        finished = srv.wait(job["id"])
        outcomes.append({"killed_after_s": round(delay, 2), "stage_when_killed": f"{stage['state']}/{stage['stage']}"
                         f"/{stage['step']}", "state_after_restart": back["state"], "final": finished["state"],
                         "steps": json.loads((data / job["id"] / "status.json").read_text()).get("steps")})
        srv.stop()
    return {"kills": kills, "jobs_finished_after_resume": sum(o["final"] == "done" for o in outcomes),
            "outcomes": outcomes}


def soak(srv: Srv, photo: str, job_id: str, count: int = 2000) -> dict:
    before = {"rss_mb": round(srv.rss_mb(), 1), "fds": srv.fds()}
    requests = [("GET", "/health", None, None), ("GET", f"/jobs/{job_id}", None, None), ("GET", "/jobs", None, None),
                ("GET", "/jobs/nope", None, None), ("GET", "/jobs", None, {"Authorization": "Bearer x"}),
                ("POST", "/jobs", request(photo, ["render.step_size=0"]), None),
                ("GET", f"/jobs/{job_id}/files/preview.png", None, None)]
    statuses: dict[int, int] = {}
    start = time.monotonic()
    for i in range(count):
        method, path, body, headers = requests[i % len(requests)]
        status, _ = srv.call(method, path, body, headers)
        statuses[status] = statuses.get(status, 0) + 1
    seconds = time.monotonic() - start
    time.sleep(1.0)
    after = {"rss_mb": round(srv.rss_mb(), 1), "fds": srv.fds()}
    return {"requests": count, "seconds": round(seconds, 1), "statuses": statuses, "before": before, "after": after}


def health_latency(srv: Srv, photo: str, clients: int = 50, seconds: float = 10.0) -> dict:
    # the largest request the API takes: MAX_OVERRIDES overrides of MAX_OVERRIDE_CHARS, the longest filename
    pad = "textual_inversion.prompt=an image of a {}"
    big = [(pad + " " * MAX_OVERRIDE_CHARS)[:MAX_OVERRIDE_CHARS - 1] + "."
           for _ in range(MAX_OVERRIDES - len(TINY) - 3)]
    overrides = [*big, "fit.iterations=100000", "fit.checkpoint_every=1000", "fit.preview_every=1000"]
    longest_name = "f" * (MAX_FILENAME_CHARS - 4) + ".png"
    status, job = srv.call("POST", "/jobs", {**request(photo, overrides), "filename": longest_name})
    assert status == 201, job
    srv.wait(job["id"], lambda j: j["stage"] == "fit" or j["state"] != "running")

    def measure(duration: float) -> list[float]:
        times, stop = [], time.monotonic() + duration
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        while time.monotonic() < stop:
            t = time.perf_counter()
            conn.request("GET", "/health", headers={"Authorization": f"Bearer {srv.token}"})
            conn.getresponse().read()
            times.append((time.perf_counter() - t) * 1000)
            time.sleep(0.05)
        conn.close()
        return times

    quiet = measure(seconds / 2)
    stop, events = threading.Event(), [0] * clients

    def listen(i):
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        conn.request("GET", f"/jobs/{job['id']}/events", headers={"Authorization": f"Bearer {srv.token}"})
        response = conn.getresponse()
        while not stop.is_set():
            if response.fp.readline().startswith(b"event: job"):
                events[i] += 1
        conn.close()

    threads = [threading.Thread(target=listen, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    loaded = measure(seconds)
    stop.set()
    srv.call("DELETE", f"/jobs/{job['id']}")
    for t in threads:
        t.join(10)

    def summary(times):
        times = sorted(times)
        return {"n": len(times), "p50_ms": round(statistics.median(times), 1),
                "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1), "max_ms": round(times[-1], 1)}

    return {"job_overrides": len(overrides) + len(TINY), "override_chars": MAX_OVERRIDE_CHARS,
            "filename_chars": MAX_FILENAME_CHARS, "sse_clients": clients, "events_received": sum(events),
            "health_without_streams": summary(quiet), "health_with_streams": summary(loaded)}


def uploads(srv: Srv, count: int = 8) -> dict:
    """`count` uploads of the largest photo at once (random bytes behind a PNG signature: refused after decoding)."""
    size = 50 * 2**20
    body = json.dumps({"image_png_base64": base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(size - 8)).decode(),
                       "preset": "fast"}).encode()
    before, peak, stop = srv.rss_mb(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], srv.rss_mb())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    statuses = [None] * count

    def send(i):
        statuses[i] = srv.call("POST", "/jobs", raw=body, timeout=300)[0]

    start = time.monotonic()
    run_concurrently(send, count)
    seconds = time.monotonic() - start
    stop.set()
    sampler.join()
    return {"uploads": count, "body_mib": round(len(body) / 2**20, 1), "statuses": statuses,
            "seconds": round(seconds, 1), "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak[0], 1),
            "rss_after_mb": round(srv.rss_mb(), 1)}


def full_disk(tmp: Path, model: Path, photo: str) -> dict:
    mount = tmp / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        return {"skipped": "cannot mount a tmpfs (not root)"}
    srv = Srv(mount / "data", model, tmp / "cache-disk", tmp / "disk.log")
    try:
        ballast = _fill(mount)
        refused = answer(*srv.call("POST", "/jobs", request(photo)))
        listed = len(srv.call("GET", "/jobs")[1]["jobs"])
        ballast.unlink()
        status, job = srv.call("POST", "/jobs", request(photo, ["fit.iterations=100000", "fit.checkpoint_every=1",
                                                                "fit.preview_every=100000"]))
        srv.wait(job["id"], lambda j: j["stage"] == "fit" or j["state"] != "running")
        ballast = _fill(mount)
        failed = srv.wait(job["id"])
        ballast.unlink()
        health = srv.call("GET", "/health")[1]
        status, after = srv.call("POST", "/jobs", request(photo))
        after = srv.wait(after["id"])
        return {"submit_on_a_full_disk": refused, "jobs_listed_after": listed,
                "job_when_the_disk_fills_mid_fit": {"state": failed["state"], **(failed["error"] or {})},
                "health_after": {"ok": health["ok"], "problems": health["problems"]},
                "next_job_after_freeing_space": after["state"]}
    finally:
        srv.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    ballast = folder / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return ballast


def token_link(tmp: Path) -> dict:
    from engine.server.app import ensure_token

    data, victim = tmp / "token-data", tmp / "victim.txt"
    data.mkdir()
    victim.write_text("keep me")
    victim.chmod(0o644)
    for pid in range(os.getpid() - 50, os.getpid() + 50):  # the old, predictable names
        (data / f".token.{pid}.tmp").symlink_to(victim)
    ensure_token(data)
    return {"attack": "symlinks planted at the predictable token temp names", "victim_unchanged":
            victim.read_text() == "keep me" and victim.stat().st_mode & 0o777 == 0o644}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server_hardening.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="realfusion-hardening-"))
    model = build_tiny_stable_diffusion(tmp / "tiny_sd")
    photo = base64.b64encode(rgba_disc(tmp / "disc.png").read_bytes()).decode()
    results = {"machine": f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS=1, tiny Stable Diffusion",
               "started": time.time()}
    srv = Srv(tmp / "data", model, tmp / "cache", tmp / "server.log")
    try:
        status, job = srv.call("POST", "/jobs", request(photo))
        done = srv.wait(job["id"])
        results["attacks"] = attacks(srv, photo, model, tmp)
        results["attacks"].append(second_server(srv, model, photo))
        results["attacks"].append(token_link(tmp))
        results["soak_2000_requests"] = soak(srv, photo, done["id"])
        results["health_latency"] = health_latency(srv, photo)
        results["concurrent_uploads"] = uploads(srv)
        results["health_at_end"] = srv.call("GET", "/health")[1]
    finally:
        srv.stop()
    results["full_disk"] = full_disk(tmp, model, photo)
    results["cancel_and_sigterm"] = cancel_and_sigterm(tmp, model, photo)
    results["kill9"] = kill9(tmp, model, photo, args.kills)
    results["seconds"] = round(time.time() - results.pop("started"), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
