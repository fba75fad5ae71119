"""Every fast path against the plain eager path, on full-size SD 1.5 with random weights (GPU).

    python bench/check_fastpaths.py [--modes none,cudagraphs,compile,compile-cudagraphs]
                                    [--skip-hashgrid] [--skip-prior] [--tiny]

Checks, each against its eager reference from the same weights and the same random draws:

* SDS: the gradient that one SDS step (96 px render upsampled to 512, VAE encode, UNet with
  CFG 100, backward) puts into the render, with prior.compile = each mode (channels_last on);
  the reference is eager with NCHW weights, computed before anything else touches the model;
* textual inversion: the gradient on the embedding row at the paper recipe (4 augmented 512 px
  views): accumulated 4 x batch 1 (the reference) vs one batch of 4, eager and each mode;
* hash grid: outputs, table gradients and input gradients of the torch, triton and tcnn
  backends (those that run here) on 2^18 points at the paper's grid, O(1) table values.

Tolerances (stated in the JSON): prior gradients in fp16 through a random UNet with guidance
scale 100 differ by rounding of differently ordered kernels, so they must agree to
`PRIOR_TOLERANCE` in normwise relative error (and cosine > 0.999); the hash grid (float32) to
`GRID_TOLERANCE` relative to the largest value. Also times each path (median ms, CUDA events)
and the first call (compile time). Writes bench/results/fastpaths_<device>.json (and into $OUT);
exits 1 when a check fails. `--tiny` runs the same code on the CPU with the tests' tiny SD
(compile modes through the "aot_eager_decomp_partition" backend): a smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from engine.config import PriorConfig, preset  # noqa: E402
from engine.fields.hashgrid import HashGridEncoding, tcnn_available, triton_available  # noqa: E402
from engine.guidance import (StableDiffusionGuidance, add_placeholder_token, load_stable_diffusion,  # noqa: E402
                             text_embeddings_for_guidance)
from engine.guidance.fast_paths import MODES, execution_layout, prior_modules  # noqa: E402
from engine.guidance.textual_inversion import denoising_loss, training_batch  # noqa: E402

PRIOR_TOLERANCE = 5e-2  # normwise relative, fp16
PRIOR_MIN_COSINE = 0.999
GRID_TOLERANCE = 1e-3  # max abs difference / max abs reference value, float32
TI_LOSS_SCALE = 1024.0  # fp16 row gradients underflow unscaled (train_embedding uses a GradScaler)
CPU_BACKEND = "aot_eager_decomp_partition"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """First call's seconds (compile), then median / min ms of `repeats` calls after `warmup`."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1000)
    return {"first_call_s": round(first_s, 2), "median_ms": round(statistics.median(times), 2),
            "min_ms": round(min(times), 2), "n": repeats}


def agreement(value: torch.Tensor, reference: torch.Tensor) -> dict:
    value, reference = value.double().flatten(), reference.double().flatten()
    diff = value - reference
    norm = reference.norm().item() or 1.0
    scale = reference.abs().max().item() or 1.0
    cosine = torch.nn.functional.cosine_similarity(value, reference, dim=0).item() if value.norm() > 0 else 0.0
    return {"norm_rel": diff.norm().item() / norm, "max_rel": diff.abs().max().item() / scale, "cosine": cosine,
            "finite": bool(torch.isfinite(value).all()), "reference_norm": norm}


def prior_ok(result: dict) -> bool:
    return result["finite"] and result["norm_rel"] <= PRIOR_TOLERANCE and result["cosine"] >= PRIOR_MIN_COSINE


# ----------------------------------------------------------------------------- prior


class PriorCase:
    """The SDS and textual-inversion computations whose gradients are compared, with fixed draws."""

    def __init__(self, sd, render_size: int, ti_resolution: int, ti_views: int):
        self.sd = sd
        self.token_id = add_placeholder_token(sd, "<e>", "object")
        self.prompt = "an image of a <e>"
        self.embeddings = text_embeddings_for_guidance(sd, self.prompt, None, self.token_id)
        self.images = torch.rand(1, 3, render_size, render_size, generator=torch.Generator().manual_seed(1))
        self.images = self.images.to(sd.device)
        image = torch.ones(3, ti_resolution, ti_resolution)
        quarter = ti_resolution // 4
        image[:, quarter:3 * quarter, quarter:3 * quarter] = torch.tensor([0.8, 0.2, 0.2])[:, None, None]
        self.ti_image, self.ti_resolution, self.ti_views = image, ti_resolution, ti_views
        self.row = sd.text_encoder.get_input_embeddings().weight[self.token_id].detach().float().clone()

    def guidance(self, modules) -> StableDiffusionGuidance:
        return StableDiffusionGuidance(self.sd, self.embeddings, PriorConfig(), modules=modules)

    def sds_gradient(self, modules) -> torch.Tensor:
        images = self.images.clone().requires_grad_()
        self.guidance(modules).sds_loss(images, generator=torch.Generator().manual_seed(2)).loss.backward()
        return images.grad

    def ti_batch(self, modules):
        return training_batch(self.sd, self.ti_image, self.ti_resolution, self.ti_views,
                              torch.Generator().manual_seed(3), modules)

    def ti_gradient(self, modules, batch, chunks: int) -> torch.Tensor:
        latents, t, noise = batch
        vector = torch.nn.Parameter(self.row.clone())
        for part in zip(latents.chunk(chunks), t.chunk(chunks), noise.chunk(chunks)):
            modules.begin_step()
            loss = denoising_loss(self.sd, *part, vector, self.token_id, self.prompt, modules) / chunks
            (loss * TI_LOSS_SCALE).backward()
        return vector.grad / TI_LOSS_SCALE


def check_prior(sd, modes: list[str], tiny: bool, repeats: int, layout: dict | None = None) -> dict:
    device = sd.device
    case = PriorCase(sd, render_size=24 if tiny else 96, ti_resolution=sd.resolution, ti_views=4)
    backend = CPU_BACKEND if device.type == "cpu" else None
    report = {"sds": {}, "textual_inversion": {}, "attention_processors": sorted(
        {type(p).__name__ for p in sd.unet.attn_processors.values()})}

    # references first: eager, NCHW weights (prior_modules turns them to channels_last in place later)
    reference_modules = prior_modules(sd, "none", channels_last=False)
    sds_reference = case.sds_gradient(reference_modules)
    batch = case.ti_batch(reference_modules)
    ti_reference = case.ti_gradient(reference_modules, batch, chunks=4)  # the recipe: 1 x accumulation 4
    report["sds"]["reference"] = {"mode": "none", "channels_last": False, "grad_norm": sds_reference.norm().item(),
                                  **timed(lambda: case.sds_gradient(reference_modules), device, repeats)}
    report["textual_inversion"]["reference"] = {
        "mode": "none", "channels_last": False, "layout": "4 x batch 1, accumulated",
        "grad_norm": ti_reference.norm().item(),
        **timed(lambda: case.ti_gradient(reference_modules, batch, 4), device, repeats)}
    batched = case.ti_gradient(reference_modules, batch, chunks=1)
    report["textual_inversion"]["batched_eager_nchw"] = {
        "mode": "none", "channels_last": False, "layout": "1 x batch 4", **agreement(batched, ti_reference),
        **timed(lambda: case.ti_gradient(reference_modules, batch, 1), device, repeats)}

    layout = layout or execution_layout(PriorConfig())
    report["layout"] = layout
    for mode in modes:
        name = f"{mode}_channels_last" if device.type == "cuda" else mode
        try:
            modules = prior_modules(sd, mode, backend=backend if mode != "none" else None, **layout)
            sds = {"mode": modules.mode, "channels_last": device.type == "cuda",
                   **timed(lambda: case.sds_gradient(modules), device, repeats)}
            sds.update(agreement(case.sds_gradient(modules), sds_reference))
            report["sds"][name] = sds
            ti = {"mode": modules.mode, "channels_last": device.type == "cuda", "layout": "1 x batch 4",
                  **timed(lambda: case.ti_gradient(modules, batch, 1), device, repeats)}
            ti.update(agreement(case.ti_gradient(modules, batch, 1), ti_reference))
            report["textual_inversion"][name] = ti
        except Exception as error:  # a mode that does not work here is a failed check, not a crash
            report["sds"].setdefault(name, {})["error"] = repr(error)[:500]
            report["sds"][name]["traceback"] = traceback.format_exc()[-2000:]
    return report


def prior_failures(report: dict) -> list[str]:
    failures = []
    for phase in ("sds", "textual_inversion"):
        for name, result in report[phase].items():
            if name == "reference":
                continue
            if "error" in result or not prior_ok(result):
                failures.append(f"{phase}/{name}")
    return failures


# ----------------------------------------------------------------------------- hash grid


def grid_backends(device: torch.device) -> dict:
    from engine.fields.hashgrid import TcnnHashGridEncoding

    backends = {"torch": HashGridEncoding}
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if triton_available() or (device.type == "cpu" and interpreting):
        from engine.fields.hashgrid_triton import TritonHashGridEncoding

        backends["triton"] = TritonHashGridEncoding
    if tcnn_available():
        backends["tcnn"] = lambda *args: TcnnHashGridEncoding(*args, dtype=torch.float32)
    return backends


def check_hash_grid(device: torch.device, tiny: bool, repeats: int) -> dict:
    field = preset("paper").field
    sizes = (field.n_levels, field.n_features_per_level, field.log2_hashmap_size, field.base_resolution,
             field.finest_resolution)
    n_points = 2**18
    if tiny:
        sizes, n_points = (6, 2, 10, 4, 64), 300
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(n_points, 3, generator=generator).to(device)
    grad_out = torch.randn(n_points, sizes[0] * sizes[1], generator=generator).to(device)
    table = None
    results, reference = {"config": list(sizes), "n_points": n_points, "tolerance_max_rel": GRID_TOLERANCE}, None
    for name, make in grid_backends(device).items():
        try:
            grid = make(*sizes).to(device)
            if table is None:
                table = torch.rand(grid.params.shape, generator=generator) * 2 - 1
            with torch.no_grad():
                grid.params.copy_(table.to(device, grid.params.dtype))
            x = points.clone().requires_grad_(name != "tcnn")  # tcnn's input gradient needs its MLP path
            out = grid(x).float()
            out.backward(grad_out)
            value = {"output": out.detach(), "param_grad": grid.params.grad.detach().float().clone(),
                     "input_grad": None if x.grad is None else x.grad.detach().clone()}

            def step():
                grid.zero_grad(set_to_none=True)
                grid(points).float().backward(grad_out)

            entry = {"timing_forward_backward": timed(step, device, repeats)}
            if reference is None:
                reference = value
            else:
                for key in ("output", "param_grad", "input_grad"):
                    if value[key] is not None and reference[key] is not None:
                        entry[key] = agreement(value[key], reference[key])
                entry["agree"] = all(entry[k]["max_rel"] <= GRID_TOLERANCE and entry[k]["finite"]
                                     for k in ("output", "param_grad", "input_grad") if k in entry)
            results[name] = entry
        except Exception as error:
            results[name] = {"error": repr(error)[:500], "traceback": traceback.format_exc()[-2000:], "agree": False}
    return results


# ----------------------------------------------------------------------------- main


def versions() -> dict:
    import diffusers
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "tinycudann": tcnn_available()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def write_report(report: dict, stem: str) -> Path:
    return save_result(report, f"{stem}_{device_name_slug(report['device'])}.json")


def save_result(report: dict, name: str) -> Path:
    """bench/results/`name` (and a copy in $OUT on the GPU machine, where the device tool returns it)."""
    text = json.dumps(report, indent=2) + "\n"
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(text)
    return out


def device_name_slug(name: str) -> str:
    return name.replace(" ", "-").lower()


def load_prior(tiny: bool, workdir: Path, device: torch.device, model_dir: str | None):
    from bench_steps import model_folder

    return load_stable_diffusion(str(model_folder(model_dir, workdir, tiny)), device, "fp32" if tiny else "auto")


def layout_of(overrides: list[str]) -> dict | None:
    """The prior's layout settings from `--set prior.KEY=VALUE` (None: the config's defaults)."""
    if not overrides:
        return None
    from engine.config import apply_overrides

    return execution_layout(apply_overrides(preset("fast"), overrides).prior)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-prior", action="store_true")
    parser.add_argument("--skip-hashgrid", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tests' tiny SD")
    parser.add_argument("--model-dir", help="keep the random-weight SD folder here and reuse it (as time_to_mesh)")
    parser.add_argument("--set", dest="layout", action="append", default=[],
                        help="prior.channels_last=, prior.vae_channels_last=, prior.vae_attention= for the modes "
                             "under test (default: the config's)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("check_fastpaths: no CUDA GPU here (use --tiny for the CPU smoke test); nothing checked.")
        return 0
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.manual_seed(0)
    report = {"benchmark": "check_fastpaths", "device": device_name(device), "versions": versions(),
              "weights": "tiny test SD (smoke test)" if args.tiny else "SD 1.5 architecture, random weights",
              "tolerances": {"prior_norm_rel": PRIOR_TOLERANCE, "prior_min_cosine": PRIOR_MIN_COSINE,
                             "hash_grid_max_rel": GRID_TOLERANCE}}
    failures = []
    if not args.skip_hashgrid:
        report["hash_grid"] = check_hash_grid(device, args.tiny, 3 if args.tiny else args.repeats)
        failures += [f"hash_grid/{name}" for name, entry in report["hash_grid"].items()
                     if isinstance(entry, dict) and entry.get("agree") is False]
        print(json.dumps(report["hash_grid"], indent=1), flush=True)
    if not args.skip_prior:
        with tempfile.TemporaryDirectory() as tmp:
            sd = load_prior(args.tiny, Path(tmp), device, args.model_dir)
            report["dtype"] = str(sd.dtype)
            modes = [m for m in args.modes.split(",") if m]
            report["prior"] = check_prior(sd, modes, args.tiny, 2 if args.tiny else args.repeats, layout_of(args.layout))
        failures += prior_failures(report["prior"])
    if device.type == "cuda":
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report["failures"] = failures
    report["agree"] = not failures
    path = write_report(report, "fastpaths")
    print(json.dumps({k: v for k, v in report.items() if k != "hash_grid"}, indent=1))
    print(f"check_fastpaths: {'all agree' if not failures else 'FAILED: ' + ', '.join(failures)} -> {path}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
