"""Per-step cost of the two long phases on the GPU, with full-size Stable Diffusion (random weights).

    python bench/bench_steps.py [--arch sd15|sd21-base] [--ti-steps 12] [--fit-steps 30]
                                [--presets paper,standard,fast] [--backends triton,tcnn,torch]
                                [--model-dir DIR] [--profile-steps 5] [--set section.key=value ...] [--tag NAME]

Builds SD 1.5 (or 2.1-base) from its published architecture with random weights,
saves it as a diffusers folder and loads it back through `load_stable_diffusion`
(the path real weights take), then times with CUDA synchronisation:

* textual inversion: optimizer steps of `train_embedding` at the paper's recipe
  (batch 1 x grad-accumulation 4, 512 px) and at the `fast` preset's (batch 4 x 1), each
  executed as its preset says (`prior.compile`: CUDA graphs by default);
* one field-fit step (`RealFusionSystem.training_step`: reference view + SDS view +
  regularisers) at each preset, with each hash-grid backend that is installed. The photo is an
  analytic sphere and the prior's random weights steer the geometry, so the marched samples differ
  from a converged fit's (bench/time_to_mesh.py times real runs);
* with --profile-steps, that many fine-phase fit steps under torch.profiler (GPU busy fraction,
  top kernels, top host operators and how often the host waited for the device);

and peak GPU memory of each. Speed does not depend on the weights' values, so these
are the real costs. Writes bench/results/steps_<arch>_<gpu>.json (and a copy in $OUT).
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.cameras import reference_camera  # noqa: E402
from engine.config import apply_overrides, preset  # noqa: E402
from engine.fields.hashgrid import tcnn_available, triton_available  # noqa: E402
from engine.guidance import (StableDiffusionGuidance, add_placeholder_token, load_stable_diffusion,  # noqa: E402
                             text_embeddings_for_guidance, train_embedding)
from engine.renderer import VolumeRenderer  # noqa: E402
from engine.system import RealFusionSystem, ReferenceView  # noqa: E402

ARCHS = {
    # UNet2DConditionModel's defaults are SD 1.x's; these are the differences.
    "sd15": dict(unet=dict(cross_attention_dim=768, attention_head_dim=8),
                 text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
                           hidden_act="quick_gelu")),
    "sd21-base": dict(unet=dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True),
                      text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                num_hidden_layers=23, projection_dim=1024, hidden_act="gelu")),
}


def build_full_size(folder: Path, arch: str) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_sd import _write_tokenizer

    spec = ARCHS[arch]
    _write_tokenizer(folder / "tokenizer")  # a small vocabulary: token ids are all the text encoder needs
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1, **spec["text"])).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(sample_size=64, **spec["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  sample_size=512).save_pretrained(folder / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012).save_pretrained(folder / "scheduler")
    return folder


def model_folder(model_dir: str | None, workdir: Path, tiny: bool = False, arch: str = "sd15") -> Path:
    """The random-weight SD folder: `model_dir` when it already holds one (built by an earlier bench run),
    else built there (or in `workdir`): the tests' tiny SD, or `arch` at full size."""
    folder = Path(model_dir) if model_dir else workdir / "sd"
    if (folder / "unet").is_dir() and (folder / "vae").is_dir():
        return folder
    if tiny:
        from tiny_sd import build_tiny_stable_diffusion

        return build_tiny_stable_diffusion(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return build_full_size(folder, arch)


def timed_steps(step, n: int, warmup: int) -> list[float]:
    """Milliseconds of each of `n` calls of `step()` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2), "n": len(times)}


def bench_textual_inversion(sd, recipe: str, steps: int, overrides: list[str] = ()) -> dict:
    recipe_cfg = apply_overrides(preset(recipe), list(overrides))
    cfg = recipe_cfg.textual_inversion
    cfg.steps = steps
    image = torch.ones(3, 512, 512)
    image[:, 128:384, 160:352] = torch.tensor([0.8, 0.2, 0.2])[:, None, None]
    stamps = []
    torch.cuda.reset_peak_memory_stats()
    train_embedding(sd, image, cfg, torch.Generator().manual_seed(0),  # the preset's execution (CUDA graphs)
                    progress=lambda step, loss: stamps.append(time.perf_counter()), execution=recipe_cfg.prior)
    per_step = [(b - a) * 1000 for a, b in zip(stamps[2:], stamps[3:])]  # first steps warm up
    return {"recipe": recipe, "batch_size": cfg.batch_size, "grad_accumulation": cfg.grad_accumulation,
            "resolution": cfg.resolution, "steps_in_preset": preset(recipe).textual_inversion.steps,
            **summary(per_step), "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def bench_fit(sd, backend: str, steps: int, preset_name: str = "paper", profile_steps: int = 0,
              overrides: list[str] = ()) -> dict:
    cfg = apply_overrides(preset(preset_name), [f"field.backend={backend}", *overrides])
    device = sd.device
    token_id = add_placeholder_token(sd, "<e>", "object")
    guidance = StableDiffusionGuidance(sd, text_embeddings_for_guidance(sd, "an image of a <e>", None, token_id),
                                       cfg.prior)
    reference = _sphere_reference(cfg, device)
    system = RealFusionSystem(cfg, reference, guidance, device)
    torch.cuda.reset_peak_memory_stats()
    results = {}
    for phase, step_index in (("coarse_albedo", 0), ("fine_shaded", int(0.7 * cfg.fit.iterations))):
        system.step = step_index  # the schedule is a function of the step: measure both regimes
        times = timed_steps(lambda: _step_at(system, step_index), steps, warmup=3)
        results[phase] = summary(times)
    if profile_steps:
        from profile_prior import gpu_busy

        fine_step = int(0.7 * cfg.fit.iterations)
        results["fine_shaded"]["profile"] = gpu_busy(lambda: _step_at(system, fine_step), device, profile_steps)
    iterations = cfg.fit.iterations
    coarse = results["coarse_albedo"]["median_ms"]
    fine = results["fine_shaded"]["median_ms"]
    estimate_s = (0.6 * coarse + 0.4 * fine) * iterations / 1000
    return {"preset": preset_name, "backend": backend, "iterations": iterations,
            "ref_resolution": cfg.render.ref_resolution, "random_resolution": cfg.render.random_resolution,
            "step_size": cfg.render.step_size, **results, "fit_estimate_s": round(estimate_s, 1),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _step_at(system, step_index):
    system.step = step_index
    system.training_step()


def _sphere_reference(cfg, device) -> ReferenceView:
    from analytic_fields import SphereField

    camera = reference_camera(cfg.camera, cfg.render.ref_resolution)
    truth = VolumeRenderer(cfg.render, cfg.field.bound).render(SphereField(0.35), None, camera, with_normals=False)
    return ReferenceView(truth.rgb[0].to(device), truth.opacity[0].to(device))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    parser.add_argument("--ti-steps", type=int, default=12)
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--presets", default="paper,standard,fast")
    parser.add_argument("--backends", default="triton,tcnn,torch",
                        help="hash-grid backends to time the fit with (those not installed are left out)")
    parser.add_argument("--model-dir", help="keep the random-weight SD folder here and reuse it")
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many fine-phase fit steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting for every preset timed (e.g. prior.vae_attention=sdpa)")
    parser.add_argument("--tag", default="", help="results go to steps_<arch>_<gpu>_<tag>.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_steps: no CUDA GPU here; nothing measured (this benchmark is GPU-only).")
        return 0

    import diffusers
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = model_folder(args.model_dir, Path(tmp), arch=args.arch)
        sd = load_stable_diffusion(str(folder), "cuda", "auto")
        load_s = time.perf_counter() - start
        report = {
            "benchmark": "bench_steps", "arch": args.arch, "weights": "random (architecture from config)",
            "device": torch.cuda.get_device_name(), "dtype": str(sd.dtype),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "tinycudann": tcnn_available()},
            "build_and_load_s": round(load_s, 1),
            "overrides": args.overrides,
            "textual_inversion": [bench_textual_inversion(sd, name, args.ti_steps, args.overrides)
                                  for name in ("paper", "fast") if args.ti_steps > 3],
            "fit": [],
        }
        installed = {"torch": True, "tcnn": tcnn_available(), "triton": triton_available()}
        backends = [b for b in args.backends.split(",") if installed.get(b)]
        for backend in backends:
            for name in args.presets.split(","):
                report["fit"].append(bench_fit(sd, backend, args.fit_steps, name, args.profile_steps, args.overrides))
                print(json.dumps(report["fit"][-1]), flush=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-").lower()
    text = json.dumps(report, indent=2)
    out = ROOT / "bench" / "results" / f"steps_{args.arch}_{gpu}{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
