"""How the prior's two big networks run: eager, torch.compile, or CUDA graphs.

SDS and textual-inversion steps are bound by kernel launches, not arithmetic (batch 1 costs
nearly what batch 4 does, shared/README.md), so the levers are fewer launches (CUDA graphs,
torch.compile's fused kernels) and faster kernels (channels_last convolutions; attention is
PyTorch's scaled_dot_product_attention already, diffusers' default processor on torch 2).

`prior_modules(sd, mode)` returns the two calls both phases make, with the math of the eager
path unchanged:

* `unet(noisy, t, context) -> eps` (float of the model's dtype);
* `encode_latents(pixels, generator) -> latents` scaled by the VAE's factor; it keeps the graph
  back to `pixels` when grad is on (SDS back-propagates through the VAE encoder). The
  posterior's sampling stays eager, so the random draws are the eager path's.

Modes: "none" (eager), "compile" (torch.compile with inductor: fused kernels, minutes of compile
time on the first step), "cudagraphs" (torch.compile's CUDA-graph backend: the recorded kernels
replayed in one launch, no code generation), "compile-cudagraphs" (both: inductor's kernels
replayed as CUDA graphs, torch.compile's mode "reduce-overhead"). They apply on CUDA; the CPU runs eager whatever
the mode. The wrapped callables are made once per loaded model and mode (kept on the
StableDiffusion object), so jobs sharing a cached model compile once. Every mode is checked
against eager on full-size random weights by bench/check_fastpaths.py (and shrunk in
tests/test_fast_paths.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.errors import EngineError

MODES = ("none", "compile", "cudagraphs", "compile-cudagraphs")


@dataclass
class PriorModules:
    mode: str  # what runs: "none" on the CPU whatever was asked
    unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    encode_latents: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]

    def begin_step(self) -> None:
        """Call once at the start of every training step: CUDA-graph trees reuse the previous step's
        output memory only after they are told that the step is over."""
        if self.mode in ("cudagraphs", "compile-cudagraphs"):
            torch.compiler.cudagraph_mark_step_begin()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise EngineError(f"Unknown prior.compile mode {mode!r}.", f"Use one of {', '.join(MODES)}.")
    return mode


def prior_modules(sd, mode: str = "none", channels_last: bool = True, *, backend: str | None = None) -> PriorModules:
    """The UNet and VAE-encoder calls of `sd` in `mode` (see the module docstring).

    `backend` overrides torch.compile's backend (tests use "aot_eager" to run the compiled path's
    tracing and autograd on the CPU); given, it applies on the CPU too.
    """
    check_mode(mode)
    on_cuda = sd.device.type == "cuda"
    if not on_cuda and backend is None:
        mode = "none"  # compile and CUDA graphs are CUDA speed-ups; the CPU runs eager
    cache = _cache(sd)
    key = (mode, bool(channels_last and on_cuda), backend)
    if key in cache:
        return cache[key]
    if channels_last and on_cuda:
        # in place, once: the same weights in NHWC order; every mode (eager too) then uses them
        sd.unet.to(memory_format=torch.channels_last)
        sd.vae.to(memory_format=torch.channels_last)
    unet, moments = _eager_unet(sd), _eager_moments(sd)
    if mode != "none":
        options = {"backend": backend} if backend else _COMPILE_OPTIONS[mode]
        unet = torch.compile(unet, dynamic=False, **options)
        moments = torch.compile(moments, dynamic=False, **options)
    encode = _eager_encode(sd) if mode == "none" else _sampled(sd, moments)
    cache[key] = PriorModules(mode=mode, unet=unet, encode_latents=encode)
    return cache[key]


_COMPILE_OPTIONS = {"compile": {}, "cudagraphs": {"backend": "cudagraphs"},
                    "compile-cudagraphs": {"mode": "reduce-overhead"}}


def _cache(sd) -> dict:
    cache = getattr(sd, "_prior_modules", None)
    if cache is None:
        cache = {}
        object.__setattr__(sd, "_prior_modules", cache)
    return cache


def _eager_unet(sd):
    def unet(noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return sd.unet(noisy, t, encoder_hidden_states=context).sample

    return unet


def _eager_encode(sd):
    """Exactly what the eager path did before fast paths existed."""
    def encode(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sd.vae.encode(pixels).latent_dist.sample(generator) * sd.vae.config.scaling_factor

    return encode


def _eager_moments(sd):
    def moments(pixels: torch.Tensor) -> torch.Tensor:
        return sd.vae.encode(pixels).latent_dist.parameters  # [B, 2 * latent channels, h, w]: mean, logvar

    return moments


def _sampled(sd, moments):
    """A compiled encoder's moments, sampled eagerly with diffusers' own posterior (same draws as eager)."""
    posterior = _posterior_class()

    def encode(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return posterior(moments(pixels)).sample(generator) * sd.vae.config.scaling_factor

    return encode


def _posterior_class():
    try:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    except ImportError:  # diffusers < 0.26
        from diffusers.models.vae import DiagonalGaussianDistribution
    return DiagonalGaussianDistribution
