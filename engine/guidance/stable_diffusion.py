"""Stable Diffusion as a frozen prior: loading, and Score Distillation Sampling (SDS).

SDS (DreamFusion, eq. (3) of RealFusion): for a rendered image x with latent z = E(x),
noise eps and a timestep t, the prior pulls the render along
    w(t) * (eps_hat(z_t; y, t) - eps) * dz/dx,
skipping the UNet Jacobian. We express that as a surrogate loss (grad.detach() * z).sum()
whose gradient w.r.t. z is exactly that vector, so ordinary `backward()` carries it into
the radiance field through the VAE encoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import PriorConfig
from engine.device import to_device
from engine.errors import DeviceError, EngineError, MissingWeightsError
from engine.guidance.fast_paths import PriorModules, modules_for

# The subfolders of a diffusers-layout checkpoint that we load (see `_loader`).
PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class StableDiffusion:
    """The frozen prior's parts, loaded once and reused across jobs."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # DDPMScheduler: only its noise schedule is used
    device: torch.device
    dtype: torch.dtype
    model_id: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native image size (512 for SD 1.5): what the UNet was trained on."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """auto: fp16 on CUDA (half the memory, same quality for SDS), fp32 elsewhere."""
    device = torch.device(device)
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise EngineError(f"Unknown prior dtype {name!r}.", f"Use one of auto, {', '.join(_DTYPES)}.")
    if name == "fp16" and device.type == "cpu":
        # Many CPU kernels (conv, group norm) have no fp16 version or are very slow.
        raise EngineError("fp16 is not supported on the CPU.", "Use prior.dtype=fp32 (or auto) on the CPU.")
    return _DTYPES[name]


def load_stable_diffusion(model: str, device: str | torch.device, dtype: str = "auto") -> StableDiffusion:
    """Load the five parts of a diffusers-layout checkpoint (hub id or local folder), frozen."""
    device = _check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    is_local = Path(model).is_dir()
    if is_local:
        missing = [part for part in PARTS if not (Path(model) / part).is_dir()]
        if missing:
            raise _missing(model, f"the folder {model} has no {', '.join(p + '/' for p in missing)}")
    elif _looks_like_path(model):
        raise _missing(model, "there is no folder at that path")
    # diffusers casts at load time (keeping any fp32-only modules in fp32); transformers' dtype
    # kwarg changed name across versions, so the text encoder is cast after loading instead.
    extra = {"unet": {"torch_dtype": torch_dtype}, "vae": {"torch_dtype": torch_dtype}}
    parts = {part: _load_part(model, part, is_local, **extra.get(part, {})) for part in PARTS}
    parts["text_encoder"].to(dtype=torch_dtype)
    for part in ("text_encoder", "unet", "vae"):
        parts[part].to(device).eval().requires_grad_(False)
    model_id = str(Path(model).resolve()) if is_local else model
    return StableDiffusion(device=device, dtype=torch_dtype, model_id=model_id, **parts)


def _check_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA GPU is visible to PyTorch.",
                          "Run with --device cpu, or install a CUDA build of torch.")
    return device


def _loader(part: str):
    # Imported here so that importing the engine stays cheap for commands without a prior.
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel, "unet": UNet2DConditionModel,
            "vae": AutoencoderKL, "scheduler": DDPMScheduler}[part]


def _load_part(model: str, part: str, is_local: bool, **kwargs):
    """Local folder: load it. Hub id: the local cache first, the network only if allowed.

    Trying the cache first means a machine that downloaded the weights once never waits
    on (or hangs on) the network again.
    """
    load = _loader(part).from_pretrained
    attempts = [True] if is_local or _offline() else [True, False]
    error: Exception | None = None
    for local_only in attempts:
        try:
            return load(model, subfolder=part, local_files_only=local_only, **kwargs)
        except (OSError, ValueError) as exc:  # HF hub errors derive from these
            error = exc
    if is_local:
        raise _missing(model, f"its {part}/ could not be read ({error})") from error
    hub = "the hub is offline (HF_HUB_OFFLINE is set)" if _offline() else "the hub is unreachable"
    raise _missing(model, f"no local folder of that name, not in the hub cache, and {hub}") from error


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else is a folder the user meant."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _missing(model: str, why: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"Stable Diffusion weights for {model!r} not found: {why}.",
        "Download them once with `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5` "
        "on a machine with internet (or pass --model /path/to/folder with unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/).",
    )


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar surrogate: d loss / d images IS the SDS gradient (through the VAE)
    timesteps: torch.Tensor  # [B] the sampled t


def _weight_sds(alpha_bar: torch.Tensor) -> torch.Tensor:
    return 1.0 - alpha_bar


def _weight_uniform(alpha_bar: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(alpha_bar)


WEIGHTINGS = {"sds": _weight_sds, "uniform": _weight_uniform}


class StableDiffusionGuidance:
    """SDS with classifier-free guidance from a frozen Stable Diffusion and fixed text embeddings.

    `text_embeddings` is one [2,77,D] (unconditional, conditional) pair, or a dict of them keyed by view
    name ("front", "side", ...: the prompt with its direction suffix, computed once) plus "default";
    `sds_loss(..., views=[...])` then guides each image with its view's prompt.
    """

    def __init__(self, sd: StableDiffusion, text_embeddings: torch.Tensor | dict[str, torch.Tensor],
                 cfg: PriorConfig, modules: PriorModules | None = None):
        if cfg.weighting not in WEIGHTINGS:
            raise EngineError(f"Unknown SDS weighting {cfg.weighting!r}.", f"Use one of {', '.join(WEIGHTINGS)}.")
        self.sd = sd
        self.cfg = cfg
        if not isinstance(text_embeddings, dict):
            text_embeddings = {"default": text_embeddings}
        self.view_embeddings = {name: e.detach().to(sd.device, sd.dtype) for name, e in text_embeddings.items()}
        self.text_embeddings = self.view_embeddings["default"]  # [2, 77, D] (uncond, cond)
        self.alphas_cumprod = sd.scheduler.alphas_cumprod.to(sd.device, torch.float32)
        total = sd.num_train_timesteps
        self.min_step = int(cfg.t_range[0] * total)
        self.max_step = int(cfg.t_range[1] * total)
        self.modules = modules or modules_for(sd, cfg)  # given: as they are (benches compare modes on one model)

    def sds_loss(self, images: torch.Tensor, cameras=None, lighting=None, background=None,
                 generator: torch.Generator | None = None, step_ratio: float | None = None,
                 views: list[str] | None = None) -> GuidanceOutput:
        """images: [B,3,H,W] in [0,1] with grad. `cameras`, `lighting` and `background` are unused
        (a text prompt judges any view, shading and backdrop; view-aware priors take them).
        `views` names each image's direction prompt (None, or a view without one: the default prompt).

        step_ratio (training progress in [0,1]) replaces the uniform t by a deterministic
        t annealed from max to min step; None keeps DreamFusion's uniform sampling.
        """
        del cameras, lighting, background
        self.modules.begin_step()
        latents = self.encode(images, generator)
        batch = latents.shape[0]
        t = self.sample_timesteps(batch, generator, step_ratio)
        noise = sample_normal(latents.shape, generator, self.sd.device)
        grad = torch.nan_to_num(self.sds_gradient(latents, t, noise, self.condition(views, batch)))
        loss = (grad * latents.float()).sum() / batch
        return GuidanceOutput(loss=loss, timesteps=t)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> scaled latents, keeping the graph back to the images."""
        size = self.sd.resolution
        if self.cfg.render_to_model_resolution and images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        pixels = (images * 2.0 - 1.0).to(self.sd.device, self.sd.dtype)
        return self.modules.encode_latents(pixels, generator)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None, step_ratio: float | None):
        if step_ratio is not None:
            t = round((1.0 - step_ratio) * self.sd.num_train_timesteps)
            t = min(max(t, self.min_step), self.max_step)
            return torch.full((batch,), t, dtype=torch.long, device=self.sd.device)
        device = generator.device if generator is not None else self.sd.device
        t = torch.randint(self.min_step, self.max_step + 1, (batch,), generator=generator, device=device)
        return to_device(t, self.sd.device)

    def condition(self, views: list[str] | None, batch: int) -> torch.Tensor:
        """[B,2,77,D]: each image's (unconditional, conditional) pair, by its view name."""
        names = views if views is not None else ["default"] * batch
        return torch.stack([self.view_embeddings.get(name, self.text_embeddings) for name in names])

    @torch.no_grad()
    def sds_gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     condition: torch.Tensor | None = None) -> torch.Tensor:
        """w(t) * (eps_cfg - noise) in float32, for latents [B,4,h,w], t [B], noise like latents,
        condition [B,2,77,D] (default: the default prompt for every image)."""
        latents = latents.detach().float()
        noisy = self.sd.scheduler.add_noise(latents, noise.float(), t)
        eps_cfg = self.predict_noise(noisy, t, condition)
        weight = WEIGHTINGS[self.cfg.weighting](self.alphas_cumprod[t]).view(-1, 1, 1, 1)
        return weight * (eps_cfg - noise.float())

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guided eps_hat: one UNet call on the batch (uncond, cond)."""
        batch = noisy.shape[0]
        if condition is None:
            condition = self.text_embeddings[None].expand(batch, -1, -1, -1)
        context = torch.cat([condition[:, 0], condition[:, 1]])
        model_in = torch.cat([noisy, noisy]).to(self.sd.dtype)
        eps = self.modules.unet(model_in, torch.cat([t, t]), context).float()
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + self.cfg.guidance_scale * (eps_cond - eps_uncond)


def sample_normal(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Float32 normal noise drawn on the generator's device (so a CPU generator works with CUDA)."""
    gen_device = generator.device if generator is not None else device
    return to_device(torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32), device)
