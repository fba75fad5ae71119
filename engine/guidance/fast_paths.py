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
replayed as CUDA graphs, torch.compile's mode "reduce-overhead"), "graphs" (CUDA graphs captured directly
with torch.cuda.graph / torch.cuda.make_graphed_callables, one per input signature: the eager kernels
replayed, a second or two of capture instead of torch.compile's tracing). They apply on CUDA; the CPU runs eager whatever
the mode. The wrapped callables are made once per loaded model and mode (kept on the
StableDiffusion object), so jobs sharing a cached model compile once. Every mode is checked
against eager on full-size random weights by bench/check_fastpaths.py (and shrunk in
tests/test_fast_paths.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from engine.device import to_device
from engine.errors import EngineError

log = logging.getLogger(__name__)

MODES = ("none", "compile", "cudagraphs", "compile-cudagraphs", "graphs")


@dataclass
class PriorModules:
    mode: str  # what runs: "none" on the CPU whatever was asked
    unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    encode_latents: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]

    def graphed(self, fn: Callable) -> Callable:
        """`fn` (tensors in, one tensor out, no randomness) as this mode runs it: replayed from CUDA graphs
        in "graphs", as it is otherwise (textual inversion's text encoder)."""
        return CapturedGraphs(fn) if self.mode == "graphs" else fn

    def begin_step(self) -> None:
        """Call once at the start of every training step: CUDA-graph trees reuse the previous step's
        output memory only after they are told that the step is over."""
        if self.mode in ("cudagraphs", "compile-cudagraphs"):
            torch.compiler.cudagraph_mark_step_begin()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise EngineError(f"Unknown prior.compile mode {mode!r}.", f"Use one of {', '.join(MODES)}.")
    return mode


def prior_modules(sd, mode: str = "none", channels_last: bool = True, *, vae_channels_last: bool | None = None,
                  vae_attention: str = "sdpa", backend: str | None = None) -> PriorModules:
    """The UNet and VAE-encoder calls of `sd` in `mode` (see the module docstring).

    `channels_last` lays the UNet's weights out NHWC (CUDA), `vae_channels_last` the VAE's (default: as
    the UNet). `vae_attention` picks the VAE's attention kernel: "sdpa" (diffusers' default,
    scaled_dot_product_attention) or "math" (diffusers' AttnProcessor: matmul, softmax, matmul). The
    VAE's one attention has a single head 512 wide over 64 x 64 positions, which no flash kernel takes:
    SDPA falls back to the memory-efficient kernel, whose backward alone took 5.8 ms of an SDS step on
    an H200, against well under a millisecond for two plain matmuls (bench/profile_prior.py).
    `backend` overrides torch.compile's backend (tests use "aot_eager" to run the compiled path's
    tracing and autograd on the CPU); given, it applies on the CPU too.
    """
    check_mode(mode)
    if vae_attention not in VAE_ATTENTION:
        raise EngineError(f"Unknown prior.vae_attention {vae_attention!r}.", f"Use one of {', '.join(VAE_ATTENTION)}.")
    on_cuda = sd.device.type == "cuda"
    if not on_cuda and (backend is None or mode == "graphs"):
        mode = "none"  # compile and CUDA graphs are CUDA speed-ups; the CPU runs eager (`backend` is torch.compile's)
    cache = _cache(sd)
    vae_channels_last = channels_last if vae_channels_last is None else vae_channels_last
    layout = (bool(channels_last and on_cuda), bool(vae_channels_last and on_cuda), vae_attention)
    key = (mode, *layout, backend)
    if key in cache:
        return cache[key]
    _set_layout(sd, layout, cache)
    unet, moments = _eager_unet(sd), _eager_moments(sd)
    if mode == "graphs":
        unet, moments = CapturedGraphs(unet), CapturedGraphs(moments)
    elif mode != "none":
        options = {"backend": backend} if backend else _COMPILE_OPTIONS[mode]
        unet = torch.compile(unet, dynamic=False, **options)
        moments = torch.compile(moments, dynamic=False, **options)
    encode = _eager_encode(sd) if mode == "none" else _sampled(sd, moments)
    cache[key] = PriorModules(mode=mode, unet=unet, encode_latents=encode)
    return cache[key]


_COMPILE_OPTIONS = {"compile": {}, "cudagraphs": {"backend": "cudagraphs"},
                    "compile-cudagraphs": {"mode": "reduce-overhead"}}


def modules_for(sd, prior=None) -> PriorModules:
    """The calls as a PriorConfig's execution settings ask (None: eager, in the config's default layout)."""
    from engine.config import PriorConfig

    prior = prior or PriorConfig(compile="none")
    return prior_modules(sd, prior.compile, **execution_layout(prior))


def execution_layout(prior) -> dict:
    """A PriorConfig's layout settings, as `prior_modules` takes them."""
    return {"channels_last": prior.channels_last, "vae_channels_last": prior.vae_channels_last,
            "vae_attention": prior.vae_attention}


VAE_ATTENTION = ("sdpa", "math")


def _set_layout(sd, layout: tuple[bool, bool, str], cache: dict) -> None:
    """Lay the shared model out as `layout` asks, in place (the same weights), reading what it is now off
    the modules themselves. A change invalidates every cached call: a CUDA graph holds the addresses of
    the weights it was captured with."""
    unet_nhwc, vae_nhwc, vae_attention = layout
    changed = False
    for module, nhwc in ((sd.unet, unet_nhwc), (sd.vae, vae_nhwc)):
        if isinstance(module, torch.nn.Module) and _is_nhwc(module) != nhwc:
            module.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
            changed = True
    processors = getattr(sd.vae, "attn_processors", {})
    if processors and _attention_of(processors) != vae_attention:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        sd.vae.set_attn_processor(AttnProcessor() if vae_attention == "math" else AttnProcessor2_0())
        changed = True
    if changed:
        cache.clear()


def _is_nhwc(module: torch.nn.Module) -> bool:
    """Whether the module's first spatial convolution weight is laid out channels-last."""
    weight = next((p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    return weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def _attention_of(processors: dict) -> str:
    return "math" if all(type(p).__name__ == "AttnProcessor" for p in processors.values()) else "sdpa"


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
    """What the eager path did before fast paths existed (the posterior's draw made by `sample_posterior`)."""
    def encode(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_posterior(sd.vae.encode(pixels).latent_dist.parameters, generator) * sd.vae.config.scaling_factor

    return encode


def _eager_moments(sd):
    def moments(pixels: torch.Tensor) -> torch.Tensor:
        return sd.vae.encode(pixels).latent_dist.parameters  # [B, 2 * latent channels, h, w]: mean, logvar

    return moments


def _sampled(sd, moments):
    """A compiled or captured encoder's moments, sampled eagerly (the same draws as eager)."""
    def encode(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_posterior(moments(pixels), generator) * sd.vae.config.scaling_factor

    return encode


def sample_posterior(parameters: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """diffusers' `DiagonalGaussianDistribution(parameters).sample(generator)`, value for value, except that a
    CPU generator's draw reaches the GPU through pinned memory: diffusers' plain copy waits for the GPU,
    once every textual-inversion step, so the host stopped queueing work there."""
    posterior = _posterior_class()(parameters)
    device = generator.device if generator is not None else parameters.device
    noise = torch.randn(posterior.mean.shape, generator=generator, device=device, dtype=parameters.dtype)
    return posterior.mean + posterior.std * to_device(noise, parameters.device)


def _posterior_class():
    try:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    except ImportError:  # diffusers < 0.26
        from diffusers.models.vae import DiagonalGaussianDistribution
    return DiagonalGaussianDistribution


class CapturedGraphs:
    """`fn` replayed from CUDA graphs, one captured per signature (shapes, dtypes, which inputs need grad).

    With grad (an input that requires it, grad mode on), torch.cuda.make_graphed_callables captures the
    forward and the backward, so autograd replays both. Without, one forward graph. The networks hold no
    random ops (eval mode) and no state that changes between calls, so a replay computes what an
    eager call computes; outputs are cloned out of the graph's memory, so a later replay cannot
    overwrite a tensor a caller still holds. The inputs' values are copied in each call.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.graphs: dict = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and any(a.requires_grad for a in args)
        key = (grad,) + tuple((a.shape, a.dtype, a.requires_grad and grad) for a in args)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(args, grad)
        if grad:
            return graph(*args).clone()
        return graph(*args)

    def _capture(self, args, grad: bool):
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad and grad) for a in args)
        try:
            if grad:
                return torch.cuda.make_graphed_callables(self.fn, samples)
            return _ForwardGraph(self.fn, samples)
        except Exception as error:  # an op that cannot be captured: this signature runs eagerly, and says so
            torch.cuda.synchronize()
            log.warning("CUDA graph capture failed (%s); running this call eagerly", error)
            return self.fn


class _ForwardGraph:
    """One no-grad forward of `fn` captured on static inputs (warmed up on a side stream first)."""

    def __init__(self, fn: Callable, samples: tuple[torch.Tensor, ...]):
        self.inputs = samples
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, args):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()
