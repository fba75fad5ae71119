"""RealFusion against ConRad on every harness object with the oracle prior: one table, contact sheets side by side.

    python bench/compare_methods.py --device cuda [--presets demo fast] [--objects box mug figure]
                                    [--methods realfusion conrad] [--gpus 0,1,2,3] [--runs-per-gpu N] [--set section.key=value ...]
                                    [--method-set conrad:conrad.outside_mask=field] [--tag NAME] [--readme]
    python bench/compare_methods.py --from RESULTS.json[#METHOD] ... --tag NAME [--readme]

Each run is the real command line, `realfusion demo -o DIR --object O --preset P --method M --restart`
(reconstruct with the oracle prior, export, `realfusion eval`), timed from outside. From each run it keeps
eval.json's mesh scores (reference-view PSNR / SSIM / mask IoU against the input, novel-view PSNR / SSIM
against the ground truth, F-score, Chamfer) and adds the field's own reference-view PSNR / SSIM: field.pt
read back as the export reads it (ConRad: the constrained field) and volume-rendered from the reference
camera at the input's size over white, against reference.png over white.

Writes bench/results/methods_<device>.json, a markdown table methods_<device>.md, and per object and preset
a contact sheet methods_<device>/<object>_<preset>.png (one eval.png per method, stacked in --methods order:
rows input / reconstruction / ground truth). --readme replaces the table in README.md between its
`<!-- methods-table -->` markers. --gpus runs that many runs at once, one per GPU; --runs-per-gpu N puts N
runs on each (all 16 runs of the default set on one H200: --gpus 0 --runs-per-gpu 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

RESULTS = ROOT / "bench" / "results"
TARGET_MESH_REFERENCE_PSNR = 30.0  # issue 13: ConRad's mesh must reproduce the reference view at this, every object
README_MARKERS = ("<!-- methods-table -->", "<!-- /methods-table -->")


def device_slug(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return "cpu"


def run_one(out: Path, obj: str, preset: str, method: str, device: str, overrides: list[str], gpu: str | None,
            concurrent: int = 1) -> dict:
    """One `realfusion demo` in a subprocess (one of `concurrent` at once); its scores, or the error it ended with."""
    args = [sys.executable, "-m", "engine.cli", "demo", "-o", str(out), "--object", obj, "--preset", preset,
            "--method", method, "--device", device, "--restart"]
    for override in overrides:
        args += ["--set", override]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # runs sharing a GPU: freed blocks go back to the pool whole, so their peaks do not fragment it
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # CPU threads per run (torch, numpy): the runs share the host's cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // concurrent)))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / "run.log", "w") as log:
        code = subprocess.call(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = round(time.perf_counter() - started, 1)
    row = {"object": obj, "preset": preset, "method": method, "wall_s": wall, "exit_code": code,
           "outdir": str(out)}
    if code != 0:
        row["error"] = (out / "run.log").read_text()[-2000:]
        return row
    scores = json.loads((out / "eval.json").read_text())
    reference, novel, geometry = scores["reference_view"], scores["novel_views"], scores["geometry"]
    row.update({
        "mesh_reference_psnr": reference["psnr"], "mesh_reference_ssim": reference["ssim"],
        "mesh_reference_iou": reference["mask_iou"],
        "novel_psnr": novel["psnr"], "novel_ssim": novel["ssim"],
        "fscore": geometry["fscore"], "fscore_002": fscore_002(geometry), "chamfer": geometry["chamfer"],
        # eval.json's own field scores (field_reference.png, at the fit's reference render size), where present
        "field_reference_psnr_fit_size": (reference.get("field") or {}).get("psnr"),
        "field_reference_iou_fit_size": (reference.get("field") or {}).get("mask_iou"),
        **field_render_scores(out, device),
    })
    return row


def fscore_002(geometry: dict) -> float | None:
    """eval.json's F-score at 0.02 (issue 11's finer threshold), where it has one."""
    return (geometry.get("fscore_at") or {}).get("0.02")


FIELD_RENDER_LOCK = threading.Lock()  # one full-size field render at a time in this process: its peak is large


def field_render_scores(outdir: Path, device: str) -> dict:
    """field_reference_scores, one run at a time, its GPU memory handed back afterwards (runs still going on
    the same GPU need it)."""
    import torch

    with FIELD_RENDER_LOCK:
        try:
            return field_reference_scores(outdir, device)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def field_reference_scores(outdir: Path, device: str) -> dict:
    """PSNR / SSIM of the field itself (as the export reads it) in the reference view, at the input's size."""
    import torch

    from engine.cameras import reference_camera
    from engine.device import resolve_device
    from engine.field_file import FIELD_FILE, load_field
    from engine.harness import metrics
    from engine.harness.evaluate import over_white
    from engine.matting import REFERENCE_NAME
    from engine.renderer import VolumeRenderer

    from engine.harness.evaluate import resized

    dev = resolve_device(device)
    field, cfg = load_field(outdir / FIELD_FILE, dev)
    truth, _alpha = over_white(outdir / REFERENCE_NAME)
    size = truth.shape[0]
    while True:  # the whole image in one batch of rays; halve it if the GPU cannot hold that
        camera = reference_camera(cfg.camera, size, dev)
        try:
            with torch.no_grad():
                rendered = VolumeRenderer(cfg.render, cfg.field.bound).render(field, None, camera, with_normals=False)
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            size //= 2
    image = rendered.rgb[0].clamp(0, 1).cpu().numpy()
    if size != truth.shape[0]:
        truth = resized(truth, size)
    return {"field_reference_psnr": metrics.psnr(image, truth), "field_reference_ssim": metrics.ssim(image, truth),
            "field_reference_resolution": size}


def side_by_side(rows: list[dict], methods: list[str], path: Path) -> None:
    """The runs' eval.png sheets stacked, in `methods` order, with a gap between them."""
    from PIL import Image

    sheets = []
    for method in methods:
        row = next((r for r in rows if r["method"] == method and r.get("exit_code") == 0), None)
        if row is not None and (Path(row["outdir"]) / "eval.png").is_file():
            sheets.append(np.asarray(Image.open(Path(row["outdir"]) / "eval.png").convert("RGB")))
    if not sheets:
        return
    width = max(s.shape[1] for s in sheets)
    gap = np.full((8, width, 3), 255, np.uint8)
    padded = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in sheets]
    stacked = np.concatenate([part for s in padded for part in (s, gap)][:-1], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stacked).save(path)


def markdown_table(rows: list[dict], device: str) -> str:
    def fmt(value, spec=".2f"):
        return "inf" if value is None else "-" if isinstance(value, str) else format(value, spec)

    lines = [f"Oracle prior, `realfusion demo`, device {device}. Reference view: against the input; novel views: "
             "7 turntable views against the ground truth.", "",
             "| object | preset | method | mesh ref PSNR | mesh ref SSIM | mesh ref IoU | field ref PSNR | field ref SSIM | "
             "novel PSNR | F@0.05 | F@0.02 | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("exit_code") != 0:
            lines.append(f"| {r['object']} | {r['preset']} | {r['method']} | failed (exit {r['exit_code']}) "
                         "| | | | | | | | |")
            continue
        lines.append(f"| {r['object']} | {r['preset']} | {r['method']} | {fmt(r['mesh_reference_psnr'])} | "
                     f"{fmt(r['mesh_reference_ssim'], '.3f')} | {fmt(r['mesh_reference_iou'], '.3f')} | "
                     f"{fmt(r['field_reference_psnr'])} | "
                     f"{fmt(r['field_reference_ssim'], '.3f')} | {fmt(r['novel_psnr'])} | {fmt(r['fscore'], '.3f')} | "
                     f"{'-' if r.get('fscore_002') is None else fmt(r['fscore_002'], '.3f')} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict]) -> dict:
    """Issue 13's targets, per object and preset: ConRad's mesh at >= 30 dB in the reference view, and its
    novel-view PSNR and F-score no worse than RealFusion's on the same object."""
    out = {}
    for r in rows:
        if r["method"] != "conrad" or r.get("exit_code") != 0:
            continue
        base = next((b for b in rows if b["method"] == "realfusion" and b["object"] == r["object"]
                     and b["preset"] == r["preset"] and b.get("exit_code") == 0), None)
        psnr = r["mesh_reference_psnr"]
        out[f"{r['object']}/{r['preset']}"] = {
            "mesh_reference_psnr_ok": psnr is None or psnr >= TARGET_MESH_REFERENCE_PSNR,
            "novel_psnr_not_worse": None if base is None else r["novel_psnr"] >= base["novel_psnr"],
            "fscore_not_worse": None if base is None else r["fscore"] >= base["fscore"],
        }
    return out


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers to put the table between")
    head, rest = text.split(start, 1)
    _old, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{tail}")


def collect(sources: list[str], tag: str, readme: bool, results: Path = RESULTS) -> int:
    """The table, targets and contact sheets of runs made by earlier calls (e.g. on a GPU, one call per preset),
    from their results files; each row's F@0.02 is read from its eval.json where the file predates it."""
    rows = []
    for source in sources:
        path, _, method = source.partition("#")
        for row in json.loads(Path(path).read_text())["runs"]:
            if method and row["method"] != method:
                continue
            scores = Path(row["outdir"]) / "eval.json"
            if row.get("fscore_002") is None and row.get("exit_code") == 0 and scores.is_file():
                row["fscore_002"] = fscore_002(json.loads(scores.read_text())["geometry"])
            rows.append({**row, "source": Path(path).name})
    key = {"object": list(dict.fromkeys(r["object"] for r in rows)), "preset": ["demo", "fast", "standard", "paper"]}
    rows.sort(key=lambda r: (key["object"].index(r["object"]), key["preset"].index(r["preset"])
                             if r["preset"] in key["preset"] else 9, r["method"] != "realfusion"))
    slug = tag or "collected"
    table = f"Runs from {', '.join(f'`{Path(s).name}`' for s in sources)}.\n" + markdown_table(rows, slug)
    result = {"device": slug, "sources": sources, "runs": rows, "targets": verdicts(rows)}
    write_results(rows, list(dict.fromkeys(r["method"] for r in rows)), slug, table, result, readme, results)
    return 0


def write_results(rows: list[dict], methods: list[str], slug: str, table: str, result: dict, readme: bool,
                  results: Path = RESULTS) -> None:
    """A contact sheet per object and preset, methods_<slug>.json / .md (and README's table), and the table
    and targets printed."""
    for obj, preset in dict.fromkeys((r["object"], r["preset"]) for r in rows):
        side_by_side([r for r in rows if r["object"] == obj and r["preset"] == preset], methods,
                     results / f"methods_{slug}" / f"{obj}_{preset}.png")
    results.mkdir(parents=True, exist_ok=True)
    (results / f"methods_{slug}.json").write_text(json.dumps(result, indent=2))
    (results / f"methods_{slug}.md").write_text(table)
    if readme:
        update_readme(table)
    print(table)
    print(json.dumps(result["targets"], indent=2))


def main() -> int:
    from engine.harness.objects import OBJECTS
    from engine.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["demo", "fast"])
    parser.add_argument("--objects", nargs="+", default=list(OBJECTS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", help="comma-separated GPU indices: one run on each at a time (default: one run)")
    parser.add_argument("--runs-per-gpu", type=int, default=1,
                        help="runs sharing each GPU at once (e.g. 16 on one H200; the runs get "
                             "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless it is set)")
    parser.add_argument("--no-retry-oom", dest="retry_oom", action="store_false",
                        help="do not run again, at the end, the runs that ran out of GPU memory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--method-set", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                        help="an override for one method's runs only, e.g. conrad:conrad.outside_mask=field")
    parser.add_argument("--tag", default="", help="results go to methods_<device>_<tag>.* (a variant's own files)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "compare_methods")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--from", dest="from_results", nargs="+", metavar="RESULTS.json[#METHOD]",
                        help="run nothing: one table and contact sheets from earlier runs' results files (only "
                             "METHOD's rows of a file named with #METHOD), written under --tag")
    args = parser.parse_args()
    if args.from_results:
        return collect(args.from_results, args.tag, args.readme)

    slug = device_slug(args.device) + (f"_{args.tag}" if args.tag else "")
    per_method: dict[str, list[str]] = {}
    for item in args.method_set:
        method, sep, override = item.partition(":")
        if not sep or method not in METHODS:
            parser.error(f"--method-set {item!r}: expected METHOD:SECTION.KEY=VALUE with METHOD one of {list(METHODS)}")
        per_method.setdefault(method, []).append(override)
    jobs = [(o, p, m) for o in args.objects for p in args.presets for m in args.methods]
    if args.runs_per_gpu < 1:
        parser.error("--runs-per-gpu must be 1 or more")
    gpus = (args.gpus.split(",") if args.gpus else [None]) * args.runs_per_gpu
    free = list(gpus)
    concurrent = max(1, min(len(gpus), len(jobs)))
    lock = threading.Lock()
    done: list[dict] = []

    def work(job):
        obj, preset, method = job
        with lock:
            gpu = free.pop()
        try:
            row = run_one(args.workdir / slug / f"{obj}_{preset}_{method}", obj, preset, method,
                          args.device, args.overrides + per_method.get(method, []), gpu, concurrent)
        finally:
            with lock:
                free.append(gpu)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        with lock:  # what has finished so far survives a run cut short (a time limit, a lost machine)
            done.append(row)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"methods_{slug}_partial.json").write_text(json.dumps({"device": slug, "runs": done}, indent=2))
        return row

    with ThreadPoolExecutor(len(gpus)) as pool:
        rows = list(pool.map(work, jobs))
    # A run that ran out of GPU memory because others on its GPU peaked at the same time goes again, once,
    # with only the other such runs beside it.
    again = [i for i, r in enumerate(rows) if r.get("exit_code") != 0 and "OutOfMemoryError" in r.get("error", "")]
    if again and args.retry_oom:
        print(f"{len(again)} run(s) ran out of GPU memory; running them again", flush=True)
        with ThreadPoolExecutor(len(gpus)) as pool:
            for i, row in zip(again, pool.map(work, [jobs[i] for i in again])):
                rows[i] = {**row, "retried_after_oom": True}

    result = {"device": slug, "presets": args.presets, "objects": args.objects, "methods": args.methods,
              "overrides": args.overrides, "method_overrides": per_method, "runs": rows, "targets": verdicts(rows)}
    write_results(rows, args.methods, slug, markdown_table(rows, slug), result, args.readme)
    (RESULTS / f"methods_{slug}_partial.json").unlink(missing_ok=True)
    return 0 if all(r.get("exit_code") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
