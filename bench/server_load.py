"""How much load one `realfusion serve` holds while a job runs (CPU, tiny model): status requests per
second and Server-Sent Events per second. A measurement, not a test:

    python bench/server_load.py [--seconds 5]
    python bench/server_load.py --hardening   # issue 15's attacks -> bench/results/server_hardening.json
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from synthetic_images import rgba_disc  # noqa: E402
from test_cli import TINY  # noqa: E402
from tiny_sd import build_tiny_stable_diffusion  # noqa: E402



def run_concurrently(target, count: int) -> None:
    """Call target(0), ..., target(count - 1) each in its own thread and wait for all of them."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hardening", action="store_true", help="run the issue-15 attacks instead "
                        "(bench/server_hardening.py: writes bench/results/server_hardening.json)")
    args, rest = parser.parse_known_args()
    if args.hardening:
        import server_hardening

        sys.argv = [sys.argv[0], *rest]
        return server_hardening.main()
    tmp = Path(tempfile.mkdtemp(prefix="realfusion-load-"))
    model = build_tiny_stable_diffusion(tmp / "tiny_sd")
    log = tmp / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--data-dir",
                                 str(tmp / "data"), "--model", str(model), "--device", "cpu", "--cache-dir",
                                 str(tmp / "cache")], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while not (found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        port = int(found[1])
        auth = {"Authorization": "Bearer " + (tmp / "data" / "token").read_text().strip()}

        def call(conn, method, path, body=None):
            if conn is None:  # a fresh connection (an idle keep-alive one is closed by the server after 5 s)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            headers = dict(auth, **({"Content-Type": "application/json"} if body else {}))
            conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        conn = None
        photo = base64.b64encode(rgba_disc(tmp / "disc.png").read_bytes()).decode()
        status, job = call(conn, "POST", "/jobs", {"image_png_base64": photo, "preset": "fast", "overrides": [
            *TINY, "fit.iterations=100000", "fit.checkpoint_every=1000", "fit.preview_every=1000"]})
        assert status == 201, job
        while (job := call(conn, "GET", f"/jobs/{job['id']}")[1])["stage"] != "fit":
            time.sleep(0.2)
        results = {}
        for clients in (1, 4):
            counts = [0] * clients
            stop = time.monotonic() + args.seconds

            def poll(i):
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # keep-alive, like a polling add-on
                while time.monotonic() < stop:
                    assert call(c, "GET", f"/jobs/{job['id']}")[0] == 200
                    counts[i] += 1

            run_concurrently(poll, clients)
            results[f"status_rps_{clients}_clients"] = round(sum(counts) / args.seconds, 1)
        step_before = call(conn, "GET", f"/jobs/{job['id']}")[1]["step"]

        for streams in (1, 20):
            counts = [0] * streams
            stop = time.monotonic() + args.seconds

            def listen(i):
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("GET", f"/jobs/{job['id']}/events", headers=auth)
                response = c.getresponse()
                while time.monotonic() < stop:
                    line = response.fp.readline()
                    if line.startswith(b"event: job"):
                        counts[i] += 1
                c.close()

            run_concurrently(listen, streams)
            results[f"sse_events_per_s_{streams}_streams"] = round(sum(counts) / args.seconds, 1)
        job = call(conn, "GET", f"/jobs/{job['id']}")[1]
        results["fit_steps_per_s_during_load"] = round((job["step"] - step_before) / (2 * args.seconds), 2)
        call(conn, "DELETE", f"/jobs/{job['id']}")
        print(json.dumps(results, indent=2))
    finally:
        proc.terminate()
        proc.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
