"""Scale-out of `realfusion batch` on Ray: N photos on N workers against one photo on one worker.

Each photo is the demo's synthetic object photographed from the reference camera and reconstructed
with the oracle prior (no weights needed), through the same Ray actor pool as `realfusion batch
--ray`. The ratio is wall(N photos, N workers) / wall(1 photo, 1 worker): about 1.0 when every
worker has its own GPU, higher when workers share a device. Writes bench/results/scale_out_<label>.json.

    python bench/scale_out.py                                   # one worker per visible GPU (CPU: 2)
    python bench/scale_out.py --workers 2 --gpus-per-worker 0.5 # two workers on one GPU: the plumbing
    python bench/scale_out.py --device cpu --tiny               # CPU, tiny sizes (about a minute on 2 cores)
    python bench/scale_out.py --ray HOST:6379                   # on a running Ray cluster
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.batch import BatchSettings, connect, run_batch  # noqa: E402

# CPU-sized overrides of the demo preset for --tiny (the fit stays real: same losses, oracle prior).
TINY = [
    "matting.image_size=64", "fit.iterations=30", "fit.preview_every=15", "fit.checkpoint_every=10",
    "fit.turntable_resolution=24", "render.ref_resolution=24", "render.random_resolution=24",
    "render.num_samples=12", "field.n_levels=4", "field.log2_hashmap_size=10", "field.finest_resolution=32",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, help="N (default: one per GPU of the cluster; 2 without a GPU)")
    parser.add_argument("--gpus-per-worker", type=float, default=1.0)
    parser.add_argument("--device", default="auto", help="auto (GPUs when there are) or cpu")
    parser.add_argument("--ray", default="local", help="local (start one here) or a cluster address")
    parser.add_argument("--object", default="figure")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized renders and 30 fit steps")
    parser.add_argument("--output", type=Path, help="JSON path (default bench/results/scale_out_<label>.json)")
    args = parser.parse_args()

    overrides = (TINY if args.tiny else []) + args.overrides
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
        "ratio": round(many["wall_s"] / one["wall_s"], 3),
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
