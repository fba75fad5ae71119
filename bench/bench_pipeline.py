"""Wall-clock of a whole `reconstruct` on the GPU, stage by stage, with full-size random-weight SD.

    python bench/bench_pipeline.py [--preset fast] [--arch sd15] [--set section.key=value ...]

Builds the Stable Diffusion architecture with random weights (bench_steps.build_full_size),
then runs `engine.pipeline.reconstruct` on a synthetic RGBA photo exactly as the CLI does
(matting, model load, textual inversion, field fit with previews and checkpoints, turntable,
GLB export) and records when each stage started. The geometry is meaningless (random weights);
the times are real. Writes bench/results/pipeline_<preset>_<arch>_<gpu>.json (and into $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_steps import build_full_size  # noqa: E402
from engine.config import build_config  # noqa: E402
from engine.pipeline import reconstruct, stable_diffusion_prior  # noqa: E402
from synthetic_images import rgba_disc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_pipeline: no CUDA GPU here; nothing measured (this benchmark is GPU-only).")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = build_full_size(Path(tmp) / "sd", args.arch)
        photo = rgba_disc(Path(tmp) / "photo.png", size=512)
        cfg = build_config(args.preset, args.overrides, model=str(model))
        stages: dict[str, float] = {}
        start = time.perf_counter()

        def report(progress):
            stages.setdefault(progress.stage, time.perf_counter() - start)

        torch.cuda.reset_peak_memory_stats()
        out = reconstruct(photo, Path(tmp) / "out", cfg, device="cuda",
                          prior=stable_diffusion_prior(cache_dir=Path(tmp) / "cache"), report=report)
        total = time.perf_counter() - start
        status = out.read_status()
        export = json.loads((out.path / "export.json").read_text()) if (out.path / "export.json").exists() else {}
    names = list(stages)
    durations = {name: round((stages[nxt] if nxt else total) - stages[name], 2)
                 for name, nxt in zip(names, names[1:] + [None])}
    gpu = torch.cuda.get_device_name()
    report_json = {
        "benchmark": "bench_pipeline", "preset": args.preset, "arch": args.arch, "overrides": args.overrides,
        "weights": "random (architecture from config)", "device": gpu, "torch": torch.__version__,
        "total_s": round(total, 1), "stage_s": durations, "state": status["state"],
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "export": {k: export.get(k) for k in ("faces", "vertices", "file_bytes", "seconds")},
    }
    text = json.dumps(report_json, indent=2) + "\n"
    name = f"pipeline_{args.preset}_{args.arch}_{gpu.replace(' ', '-').lower()}.json"
    (ROOT / "bench" / "results" / name).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
