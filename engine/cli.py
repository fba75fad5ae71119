"""`realfusion` command line: one progress bar per stage, one-line errors that say what to do."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import PRESETS, apply_overrides, preset
from .errors import EngineError

METHODS = ("realfusion",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realfusion", description="Single-image 3D reconstruction (RealFusion).")
    parser.add_argument("--version", action="version", version=f"realfusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    rec = commands.add_parser("reconstruct", help="reconstruct an object from one image")
    rec.add_argument("image", type=Path, help="photo of the object (RGBA: its alpha is the mask; else rembg)")
    rec.add_argument("-o", "--output", type=Path, required=True, help="folder for the results")
    rec.add_argument("--preset", choices=sorted(PRESETS), default="standard")
    rec.add_argument("--model", help="Stable Diffusion hub id or local folder (default: the preset's, SD 1.5)")
    rec.add_argument("--method", choices=METHODS, default="realfusion")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    rec.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value, e.g. --set fit.iterations=500 (repeatable)")
    rec.add_argument("--cache-dir", type=Path, help="where learned embeddings are cached (default ~/.cache/realfusion)")
    rec.add_argument("--restart", action="store_true", help="ignore a checkpoint left in the output folder")
    return parser


def make_config(args):
    cfg = preset(args.preset)
    cfg.seed = args.seed
    cfg.method = args.method
    if args.model:
        cfg.prior.model = args.model
    return apply_overrides(cfg, args.overrides)


class StageBars:
    """One tqdm bar per stage, closed when the next stage starts."""

    def __init__(self, stream=sys.stderr):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._stream = stream
        self._stage = None
        self._bar = None

    def __call__(self, progress) -> None:
        if progress.stage != self._stage:
            self.close()
            self._stage = progress.stage
            self._bar = self._tqdm(total=progress.total or None, desc=progress.stage, file=self._stream,
                                   dynamic_ncols=True, leave=True)
        if progress.total and self._bar.total != progress.total:
            self._bar.total = progress.total
        if progress.step:
            self._bar.update(progress.step - self._bar.n)
        if progress.metrics:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in progress.metrics.items() if k in ("total", "sds", "image",
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
    print(f"done: {out.path} (turntable.png, preview.png, field.pt, embedding.pt)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"reconstruct": cmd_reconstruct}
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
