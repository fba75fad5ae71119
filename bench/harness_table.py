"""The quality harness's table: `realfusion demo` (oracle prior) on every object at given presets, in parallel.

    python bench/harness_table.py --presets demo fast [--objects box mug figure bird] [--tree DIR --label before]
                                  [--set KEY=VALUE ...] [--jobs 8] [--device cuda]

Each (object, preset) runs `python -m engine.cli demo` as its own process (with the engine of `--tree`,
default this checkout: an older checkout measures "before"), into OUT/<label>/<preset>/<object>; every
result is then scored by THIS checkout's `realfusion eval`, so before and after are judged alike.
Writes OUT/<label>.json with the device, versions, settings and each run's scores and wall time,
and prints a Markdown table. OUT defaults to bench/results/harness.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTS = ("box", "mug", "figure", "bird")


def run_one(tree: Path, outdir: Path, obj: str, preset: str, device: str, overrides: list[str]) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "engine.cli", "demo", "-o", str(outdir), "--object", obj, "--preset", preset,
               "--device", device, "--restart", *sum((["--set", o] for o in overrides), [])]
    started = time.perf_counter()
    with open(outdir / "demo.log", "w") as log:
        done = subprocess.run(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    result = {"object": obj, "preset": preset, "returncode": done.returncode, "wall_s": round(seconds, 1)}
    if done.returncode == 0:
        scored = subprocess.run([sys.executable, "-m", "engine.cli", "eval", str(outdir)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
                                capture_output=True, text=True)
        path = outdir / "eval.json"
        if scored.returncode == 0 and path.is_file():
            result["eval"] = _scores(json.loads(path.read_text()))
        else:
            result["eval_error"] = (scored.stderr or scored.stdout)[-2000:]
    else:
        result["log_tail"] = (outdir / "demo.log").read_text()[-2000:]
    return result


def _scores(evaluation: dict) -> dict:
    g, ref, novel = evaluation["geometry"], evaluation["reference_view"], evaluation["novel_views"]
    scores = {"fscore_0.05": g["fscore_at"].get("0.05", g["fscore"]) if "fscore_at" in g else g["fscore"],
              "fscore_0.02": g.get("fscore_at", {}).get("0.02"), "chamfer": g["chamfer"],
              "mesh_ref_psnr": ref["psnr"], "mesh_ref_ssim": ref["ssim"], "mesh_ref_iou": ref["mask_iou"],
              "novel_psnr": novel["psnr"], "novel_ssim": novel["ssim"]}
    if "field" in ref:
        scores.update(field_ref_psnr=ref["field"]["psnr"], field_ref_iou=ref["field"]["mask_iou"])
    return scores


def table(runs: list[dict]) -> str:
    cols = ["fscore_0.05", "fscore_0.02", "chamfer", "mesh_ref_iou", "mesh_ref_psnr", "field_ref_iou",
            "field_ref_psnr", "novel_psnr"]
    lines = ["| object | preset | " + " | ".join(cols) + " | wall s |", "|" + " --- |" * (len(cols) + 3)]
    for r in runs:
        e = r.get("eval", {})
        cells = [f"{e[c]:.3f}" if isinstance(e.get(c), float) and c.startswith(("fscore", "chamfer", "mesh_ref_iou",
                                                                                  "field_ref_iou"))
                 else f"{e[c]:.1f}" if isinstance(e.get(c), float) else "—" for c in cols]
        lines.append(f"| {r['object']} | {r['preset']} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["demo", "fast"])
    parser.add_argument("--objects", nargs="+", default=list(OBJECTS))
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose engine runs the demos")
    parser.add_argument("--label", default="after")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "harness")
    args = parser.parse_args()
    tree = args.tree.resolve()
    work = [(obj, p) for p in args.presets for obj in args.objects]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda w: run_one(tree, args.out / args.label / w[1] / w[0], w[0], w[1], args.device,
                                               args.overrides), work))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {"label": args.label, "tree": str(tree), "device": device, "torch": torch.__version__,
              "python": platform.python_version(), "parallel_jobs": args.jobs, "overrides": args.overrides,
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.label}.json").write_text(json.dumps(result, indent=2))
    print(table(runs))


if __name__ == "__main__":
    main()
