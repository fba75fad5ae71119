"""Scale-out: N jobs on N workers against one job on one worker, through the server's workers or Ray.

Each job is the demo's synthetic object photographed from the reference camera and reconstructed
with the oracle prior (no weights needed). The ratio is wall(N jobs, N workers) / wall(1 job, 1
worker): about 1.0 when every worker has its own GPU, higher when workers share a device.
Writes bench/results/scale_out_<label>.json (the one-worker run is saved as soon as it ends).

--pool serve (the default without Ray): the job server's own worker threads (engine/server/jobs.py's
JobStore and Reconstructor, as `realfusion serve --gpus` runs them, without HTTP), one per device of
--gpus, --workers-per-gpu on each. --pool ray: the Ray actor pool of `realfusion batch --ray`.

    python bench/scale_out.py --pool serve --gpus all                   # one worker per GPU: the ratio
    python bench/scale_out.py --pool serve --gpus 0 --workers-per-gpu 2 # two workers on one GPU: the plumbing
    python bench/scale_out.py --pool serve --gpus cpu --workers-per-gpu 2 --tiny   # CPU, tiny sizes
    python bench/scale_out.py --pool ray                                # one Ray worker per visible GPU
    python bench/scale_out.py --pool ray --workers 2 --gpus-per-worker 0.5  # two Ray workers on one GPU
    python bench/scale_out.py --pool ray --device cpu --tiny            # CPU, tiny sizes
    python bench/scale_out.py --pool ray --ray HOST:6379                # on a running Ray cluster
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.batch import BatchSettings, connect, run_batch  # noqa: E402
from engine.config import build_config  # noqa: E402

# CPU-sized overrides of the demo preset for --tiny (the fit stays real: same losses, oracle prior).
TINY = [
    "matting.image_size=64", "fit.iterations=30", "fit.preview_every=15", "fit.checkpoint_every=10",
    "fit.turntable_resolution=24", "render.ref_resolution=24", "render.random_resolution=24",
    "render.step_size=0.1", "render.occupancy_resolution=32", "field.n_levels=4", "field.log2_hashmap_size=10", "field.finest_resolution=32",
    "field.hidden_dim=16", "export.resolution=32", "export.texture_size=64", "export.max_faces=2000",
]


class OraclePriors:
    """The demo's oracle prior for every photo (they all show the same object); built in each Ray worker.

    Defined in the script run as __main__, so Ray sends the class itself to the workers."""

    def __init__(self, object_name: str, cfg):
        self.object_name, self.cfg = object_name, cfg
        self._mesh = None

    def __call__(self, photo, models):
        from engine.harness.objects import make_object
        from engine.harness.oracle import oracle_prior
        from engine.harness.raycast import ColoredMesh

        if self._mesh is None:
            mesh = make_object(self.object_name, self.cfg.camera, self.cfg.matting.object_fraction)
            self._mesh = ColoredMesh.from_trimesh(mesh)
        return oracle_prior(self._mesh)


def write_photos(folder: Path, count: int, object_name: str, cfg) -> None:
    from PIL import Image

    from engine.harness.demo import photograph
    from engine.harness.objects import make_object

    folder.mkdir(parents=True, exist_ok=True)
    picture = photograph(make_object(object_name, cfg.camera, cfg.matting.object_fraction), cfg)
    for i in range(count):
        Image.fromarray(picture).save(folder / f"{object_name}-{i}.png")


def timed_batch(tmp: Path, label: str, photos: int, workers: int, settings: BatchSettings, priors, cfg,
                object_name: str) -> dict:
    folder = tmp / f"photos-{label}"
    write_photos(folder, photos, object_name, cfg)
    run = BatchSettings(**{**settings.__dict__, "workers": workers})
    started = time.perf_counter()
    summary = run_batch(folder, tmp / f"out-{label}", run, priors=priors)
    wall = time.perf_counter() - started
    results = list(summary.results.values())
    failed = [r.error for r in results if r.state != "done"]
    if failed:
        raise SystemExit(f"{label}: {len(failed)} photo(s) failed: {failed[0]}")
    seconds = [r.seconds for r in results]
    return {"photos": photos, "workers": workers, "wall_s": round(wall, 2),
            "photo_seconds": seconds, "photo_seconds_mean": round(statistics.mean(seconds), 2),
            "workers_used": [json.loads(w) for w in sorted({json.dumps(r.worker, sort_keys=True) for r in results})]}


# ------------------------------------------------------------------------------------ --pool serve


class OracleServerPriors:
    """The server's prior_factory(settings): the oracle prior, one mesh per worker thread (never shared)."""

    def __init__(self, object_name: str, cfg):
        self.object_name, self.cfg = object_name, cfg
        self._local = threading.local()

    def __call__(self, _settings):
        from engine.harness.objects import make_object
        from engine.harness.oracle import oracle_prior
        from engine.harness.raycast import ColoredMesh

        if getattr(self._local, "mesh", None) is None:
            mesh = make_object(self.object_name, self.cfg.camera, self.cfg.matting.object_fraction)
            self._local.mesh = ColoredMesh.from_trimesh(mesh)
        return oracle_prior(self._local.mesh)


def serve_devices(gpus: str, per_gpu: int) -> list[str]:
    """The worker devices of `serve --gpus GPUS`, each listed `per_gpu` times (workers sharing one device)."""
    from engine.server.jobs import parse_gpus

    return [device for device in parse_gpus(gpus) for _ in range(per_gpu)]


def timed_serve(tmp: Path, label: str, devices: list[str], preset: str, overrides: list[str], priors,
                photo: Path) -> dict:
    """len(devices) jobs submitted at once to a JobStore with one worker per entry of `devices`."""
    from engine.server.jobs import JobSettings, JobStore, Reconstructor, ServerSettings

    spans: dict[str, tuple[float, float, str]] = {}

    class TimedReconstructor(Reconstructor):
        def __call__(self, job, folder, report, device=None, check_cancel=None, worker=None):
            started = time.perf_counter()
            try:
                return super().__call__(job, folder, report, device=device, check_cancel=check_cancel, worker=worker)
            finally:
                spans[folder.name] = (started, time.perf_counter(), str(device))

    runner = TimedReconstructor(ServerSettings(), priors)  # the JobStore hands each job its worker's device
    store = JobStore(tmp / f"jobs-{label}", runner, devices=devices)
    image = photo.read_bytes()
    store.start()
    try:
        started = time.perf_counter()
        ids = [store.submit(image, JobSettings(filename=photo.name, preset=preset, overrides=list(overrides)))["id"]
               for _ in devices]
        while any(store.get(i).state in ("queued", "running") for i in ids):
            time.sleep(0.05)
        wall = time.perf_counter() - started
    finally:
        store.stop()
    records = [store.get(i) for i in ids]
    failed = [r.error or r.message for r in records if r.state != "done"]
    if failed:
        raise SystemExit(f"{label}: {len(failed)} job(s) failed: {failed[0]}")
    seconds = [round(spans[i][1] - spans[i][0], 2) for i in ids]
    first_end = min(spans[i][1] for i in ids)
    return {"jobs": len(ids), "workers": len(devices), "devices": devices, "wall_s": round(wall, 2),
            "job_seconds": seconds, "job_seconds_mean": round(statistics.mean(seconds), 2),
            "job_devices": [spans[i][2] for i in ids],
            "all_started_before_first_end": all(spans[i][0] < first_end for i in ids),  # they really overlapped
            "model_caches": len(runner.caches)}


def main_serve(args, overrides: list[str], out_path) -> int:
    import torch

    devices = serve_devices(args.gpus, args.workers_per_gpu)
    cfg = build_config(args.preset, overrides)
    priors = OracleServerPriors(args.object, cfg)
    on_gpu = devices[0] != "cpu"
    names = sorted({torch.cuda.get_device_name(torch.device(d)) for d in devices}) if on_gpu else ["cpu"]
    gpus = len(set(devices)) if on_gpu else 0
    label = (f"serve_{len(devices)}w_{gpus}gpu_{names[0].replace(' ', '-').lower()}" if on_gpu
             else f"serve_{len(devices)}w_cpu") + ("_tiny" if args.tiny else "")
    path = out_path or ROOT / "bench" / "results" / f"scale_out_{label}.json"
    result = {
        "what": "wall(N jobs on N server workers) / wall(1 job on 1 worker), oracle prior, demo object; "
                "the workers of `realfusion serve --gpus` (threads of one process, one per listed device)",
        "pool": "serve", "workers": len(devices), "gpus": gpus, "devices": devices, "device_names": names,
        "host": platform.node(), "torch": torch.__version__, "preset": args.preset, "overrides": overrides,
        "object": args.object,
    }
    with tempfile.TemporaryDirectory(prefix="realfusion-scale-") as tmp:
        photo = Path(tmp) / "photos" / f"{args.object}.png"
        write_photos(photo.parent, 1, args.object, cfg)
        (photo.parent / f"{args.object}-0.png").rename(photo)
        if args.warmup_steps:  # a short job per device first: imports, CUDA and Triton set-up are not timed
            warm_overrides = [*overrides, f"fit.iterations={args.warmup_steps}"]
            unique = list(dict.fromkeys(devices))
            # the first device alone (kernels compiled once, into Triton's cache), then the others together
            result["warmup_wall_s"] = [timed_serve(Path(tmp), f"warmup{i}", group, args.preset, warm_overrides,
                                                   priors, photo)["wall_s"]
                                       for i, group in enumerate((unique[:1], unique[1:])) if group]
        if on_gpu:
            for d in sorted(set(devices)):
                torch.cuda.reset_peak_memory_stats(torch.device(d))
        result["one"] = one = timed_serve(Path(tmp), "one", devices[:1], args.preset, overrides, priors, photo)
        _save(path, result)  # a run cut short still leaves the one-worker figure
        result["many"] = many = timed_serve(Path(tmp), "many", devices, args.preset, overrides, priors, photo)
    result["ratio"] = round(many["wall_s"] / one["wall_s"], 3)
    result["job_seconds_ratio"] = round(many["job_seconds_mean"] / one["job_seconds_mean"], 3)
    if on_gpu:
        result["peak_gpu_memory_bytes"] = {d: torch.cuda.max_memory_allocated(torch.device(d))
                                           for d in sorted(set(devices))}
    _save(path, result)
    print(f"{len(devices)} jobs on {len(devices)} server workers ({', '.join(devices)}): {many['wall_s']:.1f} s; "
          f"1 on 1: {one['wall_s']:.1f} s; ratio {result['ratio']:.2f} (per job {result['job_seconds_ratio']:.2f}); "
          f"wrote {path}")
    return 0


def _save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


# ------------------------------------------------------------------------------------ main


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", choices=("serve", "ray"), default=None,
                        help="serve: the job server's worker threads; ray: the Ray actor pool (default: ray when "
                             "it is installed, else serve)")
    parser.add_argument("--gpus", default="all", help="serve: the devices, as `serve --gpus` (all, cpu, 0,1, ...)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="serve: workers sharing each device")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="serve: fit steps of an untimed first job per device (0: none)")
    parser.add_argument("--workers", type=int, help="ray: N (default: one per GPU of the cluster; 2 without a GPU)")
    parser.add_argument("--gpus-per-worker", type=float, default=1.0, help="ray: GPU share of a worker")
    parser.add_argument("--device", default="auto", help="ray: auto (GPUs when there are) or cpu")
    parser.add_argument("--ray", default="local", help="ray: local (start one here) or a cluster address")
    parser.add_argument("--object", default="figure")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized renders and 30 fit steps")
    parser.add_argument("--output", type=Path, help="JSON path (default bench/results/scale_out_<label>.json)")
    args = parser.parse_args()

    overrides = (TINY if args.tiny else []) + args.overrides
    if (args.pool or ("ray" if _has_ray() else "serve")) == "serve":
        if args.workers_per_gpu < 1:
            parser.error("--workers-per-gpu must be at least 1")
        return main_serve(args, overrides, args.output)
    settings = BatchSettings(preset=args.preset, overrides=overrides, device=args.device, ray=args.ray,
                             gpus_per_worker=args.gpus_per_worker, workers=args.workers or 2)
    cfg = settings.config()
    import ray

    started_here = connect(settings)
    try:
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) if args.device != "cpu" else 0
        workers = args.workers or (int(gpus / args.gpus_per_worker) if gpus else 2)
        priors = OraclePriors(args.object, cfg)
        with tempfile.TemporaryDirectory(prefix="realfusion-scale-") as tmp:
            one = timed_batch(Path(tmp), "one", 1, 1, settings, priors, cfg, args.object)
            many = timed_batch(Path(tmp), "many", workers, workers, settings, priors, cfg, args.object)
    finally:
        if started_here:
            ray.shutdown()

    import torch

    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if torch.cuda.is_available() and args.device != "cpu" else ["cpu"])
    label = (f"{workers}w_{int(gpus)}gpu_{devices[0].replace(' ', '-').lower()}" if gpus
             else f"{workers}w_cpu") + ("_tiny" if args.tiny else "")
    result = {
        "what": "wall(N photos on N Ray workers) / wall(1 photo on 1 worker), oracle prior, demo object",
        "pool": "ray", "ratio": round(many["wall_s"] / one["wall_s"], 3),
        "photo_seconds_ratio": round(many["photo_seconds_mean"] / one["photo_seconds_mean"], 3),
        "one": one, "many": many,
        "workers": workers, "gpus_per_worker": args.gpus_per_worker if gpus else 0,
        "cluster": {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")},
        "devices": devices, "host": platform.node(), "ray": ray.__version__, "torch": torch.__version__,
        "preset": args.preset, "overrides": overrides, "object": args.object,
    }
    path = args.output or ROOT / "bench" / "results" / f"scale_out_{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{workers} photos on {workers} workers: {many['wall_s']:.1f} s; 1 on 1: {one['wall_s']:.1f} s; "
          f"ratio {result['ratio']:.2f} (per photo {result['photo_seconds_ratio']:.2f}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
