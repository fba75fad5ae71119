"""Drawing images from a loaded prior (a `StableDiffusion` from `load_stable_diffusion`), and judging them.

Sampling is DDIM with classifier-free guidance through the engine's own prompt encoding (`encode_prompt`), so a
learned `<e>` reaches the samples exactly as it reaches SDS. The judge is a small CNN trained on the world's
renders (ground-truth labels: shape, and color where one is shown), checked on fresh renders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..guidance.textual_inversion import encode_prompt
from .world import COLORS, SHAPES, GeometryBank, sample_batch


@torch.no_grad()
def sample_images(sd, prompts: list[str], generator: torch.Generator, steps: int = 50, guidance: float = 4.0,
                  vector: torch.Tensor | None = None, token_id: int | None = None, chunk: int = 256) -> torch.Tensor:
    """[N,3,R,R] in [0,1], one image per prompt."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(steps)
    size = sd.unet.config.sample_size
    uncond = encode_prompt(sd, "")
    images = []
    for start in range(0, len(prompts), chunk):
        batch = prompts[start:start + chunk]
        cond = torch.cat([encode_prompt(sd, p, vector, token_id) for p in batch])
        context = torch.cat([uncond.expand(len(batch), -1, -1), cond]).to(sd.dtype)
        latents = torch.randn((len(batch), sd.unet.config.in_channels, size, size), generator=generator,
                              device=generator.device).to(sd.device, torch.float32)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]).to(sd.dtype)
            eps = sd.unet(model_in, t.to(sd.device), encoder_hidden_states=context).sample.float()
            eps_uncond, eps_cond = eps.chunk(2)
            latents = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latents).prev_sample
        pixels = sd.vae.decode((latents / sd.vae.config.scaling_factor).to(sd.dtype)).sample.float()
        images.append(((pixels + 1) / 2).clamp(0, 1))
    return torch.cat(images)


class Judge(torch.nn.Module):
    """Shape and color of a 64 px image: two heads on a small CNN."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.GroupNorm(8, out), torch.nn.SiLU(),
                       torch.nn.MaxPool2d(2)]
            channels = out
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.shape = torch.nn.Linear(channels, len(SHAPES))
        self.color = torch.nn.Linear(channels, len(COLORS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images * 2 - 1)
        return self.shape(features), self.color(features)


def train_judge(bank: GeometryBank, generator: torch.Generator, steps: int, batch: int, log=print) -> Judge:
    """Trained on every combination (the held-out one too: the judge is a measuring instrument, not the prior)."""
    device = bank.coverage.device
    judge = Judge().to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        data = sample_batch(bank, batch, generator, captioned=False, include_held_out=True)
        shape_logits, color_logits = judge(data.images)
        colored = data.color >= 0
        loss = F.cross_entropy(shape_logits, data.shape)
        if colored.any():
            loss = loss + F.cross_entropy(color_logits[colored], data.color[colored])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"judge step {step} loss {loss.item():.4f}")
    return judge.eval()


@torch.no_grad()
def judge_accuracy(judge: Judge, bank: GeometryBank, generator: torch.Generator, count: int) -> dict:
    """The judge on fresh renders (colored ones: shape and color both right)."""
    data = sample_batch(bank, count, generator, captioned=False, include_held_out=True, shading="lambertian")
    shape_pred, color_pred = (logits.argmax(-1) for logits in judge(data.images))
    both = (shape_pred == data.shape) & (color_pred == data.color)
    return {"renders": count, "shape": float((shape_pred == data.shape).float().mean()),
            "color": float((color_pred == data.color).float().mean()), "both": float(both.float().mean())}


@torch.no_grad()
def classify(judge: Judge, images: torch.Tensor) -> tuple[list[str], list[str]]:
    shape_logits, color_logits = judge(images.float())
    return ([list(SHAPES)[i] for i in shape_logits.argmax(-1).tolist()],
            [list(COLORS)[i] for i in color_logits.argmax(-1).tolist()])
