"""Where the prior's time goes: the SDS step and the textual-inversion step, piece by piece (GPU).

    python bench/profile_prior.py [--modes graphs,cudagraphs,compile-cudagraphs,compile] [--repeats 20]
                                  [--model-dir DIR] [--tiny]

Issue 14 asks for an SDS step <= 35 ms and a textual-inversion step (4 views at 512 px) <= 65 ms
on one H100/H200. Before choosing a speed-up this measures, on full-size SD 1.5 with random weights:

* each piece alone (CUDA events, median of `--repeats`; check_fastpaths.timed): the VAE encoder at 512 forward + backward
  (SDS back-propagates through it), the VAE encoder forward on 4 views (textual inversion's latents,
  no grad), the UNet on the CFG pair (SDS, no grad), the UNet forward + backward into the text
  conditioning on 4 views (textual inversion), the text encoder forward + backward into the
  learned row, the augmentations of 4 views;
* whole steps: SDS (96 px render upsampled, encode, UNet with CFG, backward into the render) and
  textual inversion (augment, encode, UNet, backward, AdamW), each eager NCHW (the reference),
  eager channels_last, eager channels_last with cudnn's autotuner, and each `prior.compile` mode;
* how busy the GPU is during eager steps (torch.profiler: the kernels' summed time against the
  wall time; low means launch-bound, where CUDA graphs help; high means the kernels themselves
  are slow), and the kernels that take most of it.

Writes bench/results/profile_prior_<device>.json (and into $OUT) after every stage, so a call that
runs out of time still reports what it measured. `--tiny` runs it on the CPU with the tests' tiny SD.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from check_fastpaths import (CPU_BACKEND, PriorCase, device_name, load_prior, save_result, synchronize,  # noqa: E402
                             timed, versions)

from engine.augment import augment_batch, augmentation_config  # noqa: E402
from engine.guidance.fast_paths import prior_modules  # noqa: E402
from engine.guidance.textual_inversion import denoising_loss, encode_prompt, training_batch  # noqa: E402


class Steps:
    """The pieces and whole steps of both phases, on fixed inputs, for one `PriorModules`."""

    def __init__(self, case: PriorCase, modules):
        self.case, self.sd, self.modules = case, case.sd, modules
        sd, device = self.sd, self.sd.device
        generator = torch.Generator().manual_seed(5)
        size = sd.resolution
        self.pixels1 = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(device, sd.dtype)
        self.pixels4 = (torch.rand(4, 3, size, size, generator=generator) * 2 - 1).to(device, sd.dtype)
        latent = size // sd.vae_scale_factor
        self.noisy2 = torch.randn(2, 4, latent, latent, generator=generator).to(device, sd.dtype)
        self.noisy4 = torch.randn(4, 4, latent, latent, generator=generator).to(device, sd.dtype)
        self.t2 = torch.tensor([500, 500], device=device)
        self.t4 = torch.tensor([100, 300, 600, 900], device=device)
        self.context2 = case.embeddings.to(device, sd.dtype)  # (uncond, cond)
        self.context4 = case.embeddings[1:2].expand(4, -1, -1).contiguous().to(device, sd.dtype)
        self.vector = torch.nn.Parameter(case.row.clone())
        self.optimizer = torch.optim.AdamW([self.vector], lr=5e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=sd.dtype == torch.float16)
        self.augment_cfg = augmentation_config("gentle")

    # pieces
    def vae_encode_backward(self):
        self.modules.begin_step()
        pixels = self.pixels1.clone().requires_grad_()
        self.modules.encode_latents(pixels, None).float().sum().backward()

    @torch.no_grad()
    def vae_encode_4(self):
        self.modules.begin_step()
        self.modules.encode_latents(self.pixels4, None)

    @torch.no_grad()
    def unet_cfg_pair(self):
        self.modules.begin_step()
        self.modules.unet(self.noisy2, self.t2, self.context2)

    def unet_4_backward(self):
        self.modules.begin_step()
        context = self.context4.clone().requires_grad_()
        self.modules.unet(self.noisy4, self.t4, context).float().square().mean().backward()

    def text_encoder_backward(self):
        encode_prompt(self.sd, self.case.prompt, self.vector, self.case.token_id).float().square().mean().backward()
        self.vector.grad = None

    def augment_4(self):
        augment_batch(self.case.ti_image.to(self.sd.device), self.sd.resolution, 4, torch.Generator().manual_seed(6),
                      self.augment_cfg)

    # whole steps
    def sds_step(self):
        self.case.sds_gradient(self.modules)

    def ti_step(self):
        """One optimizer step of train_embedding at the fast/paper recipe run as one batch of 4."""
        self.modules.begin_step()
        latents, t, noise = training_batch(self.sd, self.case.ti_image, self.sd.resolution, 4,
                                           torch.Generator().manual_seed(7), self.modules, self.augment_cfg)
        loss = denoising_loss(self.sd, latents, t, noise, self.vector, self.case.token_id, self.case.prompt,
                              self.modules)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    PIECES = ("vae_encode_backward", "vae_encode_4", "unet_cfg_pair", "unet_4_backward", "text_encoder_backward",
              "augment_4")
    WHOLE = ("sds_step", "ti_step")


def gpu_busy(fn, device: torch.device, steps: int = 5) -> dict:
    """The kernels' summed time over `steps` calls against their wall time, and the top kernels."""
    fn()
    synchronize(device)
    with profiler(device) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        wall_ms = (time.perf_counter() - begin) * 1000 / steps
    return kernel_summary(prof, steps, wall_ms)


def profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def kernel_summary(prof, steps: int, wall_ms: float, top: int = 25) -> dict:
    """Per step: wall and summed kernel time (busy = their ratio), launches, the top kernels by device
    time and the top operators by their own CPU time (where the host spends a launch-bound step)."""
    averages = prof.key_averages()
    kernels = sorted((e for e in averages if e.device_type.name == "CUDA"), key=lambda e: e.self_device_time_total,
                     reverse=True)
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1000 / steps
    host = sorted((e for e in averages if e.device_type.name == "CPU"), key=lambda e: e.self_cpu_time_total,
                  reverse=True)
    return {"wall_ms": round(wall_ms, 2), "kernel_ms": round(kernel_ms, 2),
            "busy": round(kernel_ms / wall_ms, 3) if wall_ms else None,
            "kernels_per_step": round(sum(e.count for e in kernels) / steps),
            "top_kernels": [{"name": e.key[:120], "ms_per_step": round(e.self_device_time_total / 1000 / steps, 3),
                             "calls_per_step": round(e.count / steps, 1)} for e in kernels[:top]],
            "top_host_ops": [{"name": e.key[:80], "cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 3),
                              "calls_per_step": round(e.count / steps, 1)} for e in host[:top]]}


LAYOUTS = {  # label suffix: (UNet NHWC, VAE NHWC, VAE attention)
    "": (True, True, "sdpa"), "_vae_math": (True, True, "math"), "_vae_nchw_math": (True, False, "math"),
    "_nchw_math": (False, False, "math"),
}


def variants(modes: str, which: str) -> list[dict]:
    """The eager references, then each mode in each layout (`which`: comma-separated labels to keep, or all)."""
    out = [dict(label="eager_nchw", mode="none", channels_last=False, vae_channels_last=False, vae_attention="sdpa"),
           dict(label="eager_channels_last", mode="none", channels_last=True, vae_channels_last=True,
                vae_attention="sdpa"),
           dict(label="eager_channels_last_cudnn_benchmark", mode="none", channels_last=True, vae_channels_last=True,
                vae_attention="sdpa", cudnn_benchmark=True)]
    for mode in filter(None, modes.split(",")):
        for suffix, (unet, vae, attention) in LAYOUTS.items():
            out.append(dict(label=mode + suffix, mode=mode, channels_last=unet, vae_channels_last=vae,
                            vae_attention=attention))
    keep = set(filter(None, which.split(",")))
    return [v for v in out if not keep or v["label"] in keep]


def ti_loop_ms(case: PriorCase, variant: dict, device: torch.device, counts: tuple[int, int]) -> float:
    """ms per step of `train_embedding` itself (4 views of 512 px a step, as `fast`), from two runs of
    different lengths (the difference leaves out the per-run set-up: placeholder, graph capture)."""
    from engine.config import PriorConfig, TextualInversionConfig
    from engine.guidance import train_embedding

    execution = PriorConfig(compile=variant["mode"], channels_last=variant["channels_last"],
                            vae_channels_last=variant["vae_channels_last"], vae_attention=variant["vae_attention"])
    seconds = []
    for steps in counts:
        cfg = TextualInversionConfig(steps=steps, batch_size=4, grad_accumulation=1, resolution=case.sd.resolution,
                                     cache=False)
        synchronize(device)
        begin = time.perf_counter()
        train_embedding(case.sd, case.ti_image, cfg, torch.Generator().manual_seed(0), execution=execution)
        synchronize(device)
        seconds.append(time.perf_counter() - begin)
    return round((seconds[1] - seconds[0]) / (counts[1] - counts[0]) * 1000, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="graphs,cudagraphs,compile-cudagraphs,compile")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", default="", help="comma-separated variant labels to run (default: all)")
    parser.add_argument("--whole-only", action="store_true", help="time whole steps only, not the pieces")
    parser.add_argument("--model-dir")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("profile_prior: no CUDA GPU here (use --tiny for the CPU smoke test); nothing measured.")
        return 0
    device = torch.device("cpu" if args.tiny else "cuda")
    repeats = 2 if args.tiny else args.repeats
    report = {"benchmark": "profile_prior", "device": device_name(device), "versions": versions(),
              "weights": "tiny test SD (smoke test)" if args.tiny else "SD 1.5 architecture, random weights",
              "targets_ms": {"sds_step": 35, "ti_step": 65}, "variants": {}}
    name = f"profile_prior_{report['device'].replace(' ', '-').lower()}.json"
    with tempfile.TemporaryDirectory() as tmp:
        sd = load_prior(args.tiny, Path(tmp), device, args.model_dir)
        report["dtype"] = str(sd.dtype)
        case = PriorCase(sd, render_size=24 if args.tiny else 96, ti_resolution=sd.resolution, ti_views=4)
        for variant in variants(args.modes, args.variants):
            label = variant.pop("label")
            torch.backends.cudnn.benchmark = variant.pop("cudnn_benchmark", False)
            entry = report["variants"][label] = dict(variant, cudnn_benchmark=torch.backends.cudnn.benchmark)
            try:
                backend = CPU_BACKEND if args.tiny and variant["mode"] != "none" else None
                steps = Steps(case, prior_modules(sd, backend=backend, **variant))
                pieces = not args.whole_only and variant["mode"] in ("none", "cudagraphs", "graphs")
                for piece in Steps.WHOLE + (Steps.PIECES if pieces else ()):
                    entry[piece] = timed(getattr(steps, piece), device, repeats)
                    print(label, piece, entry[piece], flush=True)
                entry["ti_loop_ms"] = ti_loop_ms(case, variant, device, (2, 4) if args.tiny else (5, 25))
                print(label, "ti_loop_ms", entry["ti_loop_ms"], flush=True)
                if label == "eager_channels_last" or variant["mode"] == "graphs":
                    entry["profile"] = {whole: gpu_busy(getattr(steps, whole), device) for whole in Steps.WHOLE}
                    print(label, {k: {x: v[x] for x in ("wall_ms", "kernel_ms", "busy", "kernels_per_step")}
                                  for k, v in entry["profile"].items()}, flush=True)
            except Exception as error:  # a mode that fails here is reported, the others still run
                entry["error"] = repr(error)[:1000]
            if device.type == "cuda":
                report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            path = save_result(report, name)
    print(f"profile_prior -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
