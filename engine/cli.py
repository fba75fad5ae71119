"""`realfusion` command line: one progress bar per stage, one-line errors that say what to do."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import DEMO_PRESETS, PRESETS
from .errors import ConfigError, EngineError
from .methods import METHODS

METHOD_HELP = "; ".join(f"{name}: {method.description}" for name, method in METHODS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realfusion", description="Single-image 3D reconstruction (RealFusion).")
    parser.add_argument("--version", action="version", version=f"realfusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    rec = commands.add_parser("reconstruct", help="reconstruct an object from one image")
    rec.add_argument("image", type=Path, help="photo of the object (RGBA: its alpha is the mask; else rembg)")
    rec.add_argument("-o", "--output", type=Path, required=True, help="folder for the results")
    rec.add_argument("--preset", choices=sorted(PRESETS), default="standard")
    rec.add_argument("--model", help="Stable Diffusion hub id or local folder (default: the preset's, SD 1.5)")
    rec.add_argument("--method", default="realfusion", help=f"how to reconstruct ({METHOD_HELP})")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--initializer", metavar="WORD",
                     help="a word naming the object (bird, mug, ...): textual inversion starts its token there "
                          "(default: object)")
    rec.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    rec.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value, e.g. --set fit.iterations=500 (repeatable)")
    rec.add_argument("--cache-dir", type=Path, help="where learned embeddings are cached (default ~/.cache/realfusion)")
    rec.add_argument("--restart", action="store_true", help="ignore a checkpoint left in the output folder")

    bat = commands.add_parser("batch", help="reconstruct every photo of a folder, one subfolder each: skips those "
                                            "done, resumes interrupted ones; optionally spread over a Ray cluster")
    bat.add_argument("photos", type=Path, help="folder of photos (PNG, JPEG, ...; subfolders are not searched)")
    bat.add_argument("-o", "--output", type=Path, required=True,
                     help="folder for the results: OUT/<photo>/ each, and the summary OUT/batch.json")
    bat.add_argument("--preset", choices=sorted(PRESETS), default="standard")
    bat.add_argument("--model", help="Stable Diffusion hub id or local folder (default: the preset's, SD 1.5)")
    bat.add_argument("--method", choices=METHODS, default="realfusion")
    bat.add_argument("--seed", type=int, default=0)
    bat.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when there is one); "
                                                      "with Ray: cpu for CPU workers, else one GPU per worker")
    bat.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value, e.g. --set fit.iterations=500 (repeatable)")
    bat.add_argument("--cache-dir", type=Path, help="where learned embeddings are cached (default ~/.cache/realfusion)")
    _add_ray_arguments(bat, "photo", "run on Ray: the address of a running cluster (host:6379, auto), or local to "
                                     "start one here")

    demo = commands.add_parser("demo", help="offline demo: reconstruct a bundled synthetic object with the "
                                            "oracle prior (no weights needed), export it and score it")
    demo.add_argument("-o", "--output", type=Path, default=Path("out/demo"), help="folder for the results")
    demo.add_argument("--object", default="figure", help="which bundled object: box, mug, figure or bird")
    demo.add_argument("--preset", choices=sorted(DEMO_PRESETS), default="demo")
    demo.add_argument("--method", default="realfusion", help=f"how to reconstruct ({METHOD_HELP})")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one config value (repeatable)")
    demo.add_argument("--restart", action="store_true", help="ignore a checkpoint left in the output folder")

    srv = commands.add_parser("serve", help="run the local job server that the Blender add-on talks to")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8765, help="port to listen on; 0 picks a free one (default 8765)")
    srv.add_argument("--data-dir", "--jobs-dir", dest="data_dir", type=Path,
                     help="folder of the jobs and of the token file `token` (default $REALFUSION_DATA or "
                          "~/.local/share/realfusion/jobs); --jobs-dir is the old name")
    srv.add_argument("--model", help="default Stable Diffusion hub id or local folder (default: SD 1.5)")
    srv.add_argument("--gpus", help="devices to run jobs on, one job at a time each: all (every visible CUDA GPU, "
                                    "or the CPU when there is none; the default), cpu, or indices such as 0,1")
    srv.add_argument("--device", default="auto", help="cuda, cuda:N or cpu: one worker on that device "
                                                      "(used when --gpus is not given)")
    srv.add_argument("--cache-dir", type=Path, help="where learned embeddings are cached (default ~/.cache/realfusion)")
    srv.add_argument("--max-upload-mb", type=float, default=50.0, help="largest photo accepted, in MiB (default 50)")
    srv.add_argument("--max-megapixels", type=float, default=64.0,
                     help="largest photo accepted, in millions of pixels (default 64)")
    srv.add_argument("--header-timeout", type=float, default=10.0, help=argparse.SUPPRESS)  # tests: seconds
    _add_ray_arguments(srv, "job", "run the jobs on Ray workers instead of this machine's devices: a running "
                                   "cluster's address, or local to start one here (the data folder must be on every node)")

    exp = commands.add_parser("export", help="write the reconstructed object as a textured mesh (GLB or OBJ) with "
                                             "its camera; `reconstruct` runs this at its end")
    exp.add_argument("outdir", type=Path, help="a folder `reconstruct` wrote (it holds field.pt)")
    exp.add_argument("--resolution", type=int, help="marching-cubes grid points per side (default 256)")
    exp.add_argument("--texture", type=int, dest="texture_size", help="albedo texture side in pixels (default 2048)")
    exp.add_argument("--faces", type=int, dest="max_faces", help="decimate to this many triangles, 0: keep all "
                                                                 "(default 50000)")
    exp.add_argument("--format", choices=("glb", "obj"), help="glb: one file with the camera (default); obj: "
                                                             "OBJ + MTL + PNG")
    exp.add_argument("--vertex-colors", action="store_const", const=True, dest="vertex_colors",
                     help="albedo on the vertices instead of a texture (quicker, for a first look)")
    exp.add_argument("--size", type=float, dest="object_size_m", help="the object's longest side in meters "
                                                                      "(default 1; 0 keeps the field's units)")
    exp.add_argument("--origin", choices=("center", "bottom"), help="object centered at the origin (default), or "
                                                                   "resting on z = 0")
    exp.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when there is one)")

    ev = commands.add_parser("eval", help="score an exported reconstruction against ground truth (F-score, Chamfer, "
                                          "PSNR, SSIM); writes eval.json and eval.png")
    ev.add_argument("outdir", type=Path, help="a folder `reconstruct` or `demo` wrote (mesh.glb, camera.json, ...)")
    ev.add_argument("--ground-truth", type=Path, help="folder with mesh.ply and points.npy "
                                                      "(default OUTDIR/ground_truth)")
    ev.add_argument("--views", type=int, default=8, help="turntable views compared with the ground truth (default 8)")
    ev.add_argument("--resolution", type=int, default=256, help="side of the compared images in pixels (default 256)")
    return parser


def _add_ray_arguments(parser: argparse.ArgumentParser, unit: str, ray_help: str) -> None:
    """The Ray pool's options, alike for `batch` (a photo per task) and `serve` (a job per task)."""
    parser.add_argument("--ray", metavar="ADDRESS|local", help=ray_help)
    parser.add_argument("--workers", type=int, help="Ray workers (implies --ray local when --ray is not given; "
                                                    "default: one per GPU of the cluster, or 1 on CPU)")
    parser.add_argument("--gpus-per-worker", type=float, default=1.0,
                        help="GPU share of a Ray worker (default 1; 0.5 puts two workers on each GPU)")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help=f"runs of a {unit} whose worker keeps dying before it is reported failed (default 3)")


def make_config(args):
    """The whole config, validated (engine.validation) before any work starts."""
    from .validation import checked_config

    return checked_config(args.preset, args.overrides, seed=args.seed, method=args.method,
                          model=getattr(args, "model", None),
                          initializer=getattr(args, "initializer", None))


class StageBars:
    """One tqdm bar per stage, closed when the next stage starts."""

    def __init__(self, stream=None):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._stream = stream or sys.stderr
        self._stage = None
        self._bar = None

    def __call__(self, progress) -> None:
        if progress.stage != self._stage:
            self.close()
            self._stage = progress.stage
            if progress.stage == "done":
                return
            # Stages without steps (matting, loading the model) show their elapsed time only.
            style = {} if progress.total else {"bar_format": "{desc}: {elapsed}"}
            self._bar = self._tqdm(total=progress.total or None, desc=progress.stage, file=self._stream,
                                   dynamic_ncols=True, leave=True, **style)
        if self._bar is None:
            return
        if progress.total and self._bar.total != progress.total:
            self._bar.total = progress.total
        if progress.step:
            self._bar.update(progress.step - self._bar.n)
        if progress.metrics:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in progress.metrics.items() if k in ("total", "sds", "image", "skipped",
                                                                                            "mask", "loss")})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def cmd_reconstruct(args) -> int:
    from .pipeline import reconstruct, stable_diffusion_prior

    cfg = make_config(args)
    bars = StageBars()
    try:
        out = reconstruct(args.image, args.output, cfg, device=args.device,
                          prior=stable_diffusion_prior(cache_dir=args.cache_dir), report=bars,
                          resume=not args.restart)
    finally:
        bars.close()
    _print_done(out)
    return 0


def cmd_batch(args) -> int:
    from .batch import BatchProgressBar, BatchSettings, run_batch

    settings = BatchSettings(preset=args.preset, method=args.method, model=args.model, seed=args.seed,
                             overrides=args.overrides, device=args.device, cache_dir=args.cache_dir, ray=args.ray,
                             workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                             max_attempts=args.max_attempts)
    summary = run_batch(args.photos, args.output, settings, progress=BatchProgressBar())
    counts = summary.counts()
    print(f"batch: {counts['done']} done ({counts['skipped']} already), {counts['failed']} failed; "
          f"summary in {summary.path}")
    return 1 if counts["failed"] else 0


def cmd_demo(args) -> int:
    from .harness.demo import run_demo
    from .harness.objects import OBJECTS

    if args.object not in OBJECTS:
        raise ConfigError(f"Unknown demo object {args.object!r}; the objects are {', '.join(OBJECTS)}.")
    cfg = make_config(args)
    bars = StageBars()
    try:
        out = run_demo(args.output, cfg, args.object, device=args.device, report=bars, resume=not args.restart)
    finally:
        bars.close()
    _print_done(out)
    from .harness.evaluate import EVAL_FILE, SHEET_FILE, evaluate, summary

    result = evaluate(out.path)
    print(f"{summary(result)}; wrote {out.path / EVAL_FILE} and {out.path / SHEET_FILE}")
    return 0


def _print_done(out) -> None:
    mesh = (out.read_status() or {}).get("mesh")
    print(f"done: {out.path} ({mesh + ', ' if mesh else ''}turntable.png, preview.png, field.pt)")


def cmd_export(args) -> int:
    from .export import export

    changes = {name: getattr(args, name) for name in ("resolution", "texture_size", "max_faces", "format",
                                                      "vertex_colors", "object_size_m", "origin")
               if getattr(args, name) is not None}
    bars = StageBars()
    try:
        result = export(args.outdir, device=args.device, report=bars, **changes)
    finally:
        bars.close()
    print(f"exported: {result.mesh_path} ({result.faces} faces, {result.file_bytes / 1e6:.1f} MB"
          f"{'' if result.watertight else ', not watertight'}) and camera.json, in {result.seconds:.0f} s")
    return 0


def cmd_eval(args) -> int:
    from .harness.evaluate import EVAL_FILE, SHEET_FILE, evaluate, summary

    result = evaluate(args.outdir, args.ground_truth, views=args.views, resolution=args.resolution)
    print(f"{summary(result)}; wrote {args.outdir / EVAL_FILE} and {args.outdir / SHEET_FILE}")
    return 0


def cmd_serve(args) -> int:
    try:
        from .server.app import serve
        from .server.jobs import ServerSettings, default_jobs_dir
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        raise EngineError(f"`realfusion serve` needs {exc.name}, which is not installed.",
                          "Install the server extra: pip install 'realfusion-blender[server]'.") from exc
    ray = args.ray or ("local" if args.workers is not None else None)
    if ray is not None and args.gpus is not None:
        raise EngineError("--gpus picks this machine's devices; with --ray each Ray worker gets its own GPU.",
                          "Use --ray with --workers N (and --gpus-per-worker), or --gpus without --ray.")
    if args.max_attempts < 1:
        raise EngineError("--max-attempts must be at least 1.", "Use --max-attempts 3 (the default).")
    gpus = args.gpus if args.gpus is not None or args.device != "auto" else "all"
    settings = ServerSettings(model=args.model, device=args.device, gpus=None if ray else gpus,
                              cache_dir=args.cache_dir, host=args.host, max_upload_bytes=int(args.max_upload_mb * 2**20),
                              max_pixels=int(args.max_megapixels * 1e6), header_timeout_s=args.header_timeout,
                              ray=ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                              max_attempts=args.max_attempts)
    return serve(args.data_dir or default_jobs_dir(), settings, port=args.port)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"reconstruct": cmd_reconstruct, "batch": cmd_batch, "demo": cmd_demo, "serve": cmd_serve,
                "export": cmd_export, "eval": cmd_eval}
    try:
        return handlers[args.command](args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
