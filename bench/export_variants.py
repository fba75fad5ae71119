"""Export settings compared on the same fitted fields: each run folder exported again per variant and scored.

    python bench/export_variants.py RUN_DIR... --variant cameras:cavity_sight=cameras [--variant NAME:K=V,K=V]
                                    [--device cuda] [--out bench/results/harness/export_variants.json]

A run folder is one `realfusion demo` (or bench/compare_methods.py) wrote: its field.pt and ground_truth/.
Each variant goes to RUN_DIR__NAME, a copy of the folder (field.pt hard-linked) exported with the export
settings changed as given and scored by `realfusion eval`; the folder's own mesh is scored as "as run".
Writes one JSON (device, versions, per folder and variant: F-scores, precision, Chamfer, reference and novel
views, export seconds) and prints a Markdown table. The fits are not repeated, so what differs is the export.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import ReconstructionConfig, apply_overrides  # noqa: E402
from engine.field_file import FIELD_FILE  # noqa: E402
from engine.harness.evaluate import evaluate  # noqa: E402

MESH_FILES = ("mesh.glb", "mesh.obj", "mesh.mtl", "texture.png", "export.json", "camera.json", "eval.json", "eval.png")


def parse_variant(text: str) -> tuple[str, dict]:
    """"NAME:key=value,key=value" -> (NAME, {key: value}), parsed as `--set export.key=value` parses them."""
    name, _, settings = text.partition(":")
    keys = [item.partition("=")[0] for item in filter(None, settings.split(","))]
    cfg = apply_overrides(ReconstructionConfig(), [f"export.{item}" for item in filter(None, settings.split(","))])
    return name, {key: getattr(cfg.export, key) for key in keys}


def variant_folder(run: Path, name: str) -> Path:
    """A copy of `run` without its mesh, field.pt hard-linked (the same bytes, no copy of tens of MB)."""
    folder = run.parent / f"{run.name}__{name}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns(FIELD_FILE, *MESH_FILES),
                    copy_function=shutil.copy2)
    os.link(run / FIELD_FILE, folder / FIELD_FILE)
    return folder


def scores(result: dict) -> dict:
    geometry, reference = result["geometry"], result["reference_view"]
    return {"fscore_005": geometry["fscore_at"]["0.05"], "fscore_002": geometry["fscore_at"]["0.02"],
            "precision": geometry["precision"], "recall": geometry["recall"], "chamfer": geometry["chamfer"],
            "mesh_ref_psnr": reference["psnr"], "mesh_ref_iou": reference["mask_iou"],
            "novel_psnr": result["novel_views"]["psnr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "harness" / "export_variants.json")
    args = parser.parse_args()
    from engine.export import export  # late: torch

    variants = [parse_variant(v) for v in args.variant]
    rows = []
    for run in args.runs:
        row = {"run": run.name, "as run": scores(evaluate(run))}
        for name, changes in variants:
            folder = variant_folder(run, name)
            started = time.perf_counter()
            export(folder, device=args.device, **changes)
            row[name] = {**scores(evaluate(folder)), "export_s": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
              "variants": {name: changes for name, changes in variants}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    names = ["as run"] + [name for name, _ in variants]
    print("| run | " + " | ".join(f"{n}: F@0.05 / F@0.02 / precision / mesh ref PSNR / IoU" for n in names) + " |")
    print("| --- |" + " --- |" * len(names))
    for row in rows:
        cells = [f"{row[n]['fscore_005']:.3f} / {row[n]['fscore_002']:.3f} / {row[n]['precision']:.3f} / "
                 f"{row[n]['mesh_ref_psnr']:.1f} / {row[n]['mesh_ref_iou']:.3f}" for n in names]
        print(f"| {row['run']} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
