"""An oracle prior: SDS whose denoiser knows the true object.

Same interface and the same SDS equation as `StableDiffusionGuidance`, but in image
space (a random tiny VAE would only blur the signal) and with the ideal denoiser of
a one-object world: given x_t = sqrt(a) x + sqrt(1-a) eps from a render x of `cameras`,
it predicts eps_hat = (x_t - sqrt(a) x*) / sqrt(1-a), where x* is the true render from
the same cameras. Then w(t) (eps_hat - eps) = w(t) sqrt(a / (1-a)) (x - x*): the
prior's pull is exactly toward the truth, with the paper's t-sampling and weighting.
"""

from __future__ import annotations

import torch

from ..cameras import Cameras
from ..config import PriorConfig
from ..renderer import Lighting
from ..guidance.stable_diffusion import WEIGHTINGS, GuidanceOutput, sample_normal
from .raycast import ColoredMesh, render_ground_truth


def stable_diffusion_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """Stable Diffusion's noise schedule (scaled-linear betas 0.00085 to 0.012), as its scheduler has it."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


class OracleGuidance:
    """`gain` multiplies the gradient. An ideal denoiser's residual has no natural size next to a real
    model's (whose guidance scale of 100 makes it large), so the harness picks it: see `oracle_prior`."""

    def __init__(self, mesh: ColoredMesh, cfg: PriorConfig, generator: torch.Generator | None = None,
                 gain: float = 1.0):
        if cfg.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown SDS weighting {cfg.weighting!r}")
        self.mesh = mesh
        self.gain = gain
        self.cfg = cfg
        self.generator = generator
        self.alphas_cumprod = stable_diffusion_alphas_cumprod()
        total = len(self.alphas_cumprod)
        self.min_step, self.max_step = int(cfg.t_range[0] * total), int(cfg.t_range[1] * total)

    def truth(self, cameras: Cameras, size: tuple[int, int], lighting: Lighting | None = None,
              background: torch.Tensor | None = None) -> torch.Tensor:
        """True renders [B,3,H,W] in [0,1] from `cameras` at `size`, shaded as the render was and over
        its `background` [B,3,H,W] (white when None): the image the field should have produced."""
        view = render_ground_truth(self.mesh, cameras.with_resolution(size[1], size[0]), supersample=1,
                                   lighting=lighting)
        rgb, clear = view.rgb.permute(0, 3, 1, 2), (1.0 - view.mask)[:, None]
        if background is not None:
            rgb = rgb - clear + clear * background.to(rgb.device)  # swap white for the render's background
        return rgb

    def sds_loss(self, images: torch.Tensor, cameras: Cameras | None = None, lighting: Lighting | None = None,
                 background: torch.Tensor | None = None, t: torch.Tensor | None = None,
                 views: list[str] | None = None) -> GuidanceOutput:
        """The oracle knows every view of the object: a direction prompt (`views`) tells it nothing."""
        if cameras is None:
            raise ValueError("the oracle prior needs the cameras the images were rendered from")
        batch = images.shape[0]
        x = images * 2.0 - 1.0
        target = self.truth(cameras, images.shape[-2:], lighting, background).to(images.device) * 2.0 - 1.0
        if t is None:
            t = torch.randint(self.min_step, self.max_step + 1, (batch,), generator=self.generator)
        alpha_bar = self.alphas_cumprod[t].to(images.device).view(-1, 1, 1, 1)
        noise = sample_normal(x.shape, self.generator, images.device)
        with torch.no_grad():
            noisy = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
            eps_hat = (noisy - alpha_bar.sqrt() * target) / (1 - alpha_bar).sqrt()
            grad = self.gain * WEIGHTINGS[self.cfg.weighting](alpha_bar) * (eps_hat - noise)
        loss = (grad * x).sum() / batch  # d loss / d x = grad, as in the latent-space version
        return GuidanceOutput(loss=loss, timesteps=t)


def oracle_gain(cfg) -> float:
    """The oracle's gain: the SDS schedule's initial loss scale, so that at the start of a fit the oracle
    pulls as hard against the reference losses as it did at SDS weight 1 (the harness's calibration before
    the schedule existed); the schedule's later growth then applies to it as to any prior."""
    return cfg.loss.sds_initial_scale if cfg.loss.sds_schedule == "gradscaler" else 1.0


def oracle_prior(mesh: ColoredMesh):
    """A prior factory for `engine.pipeline.reconstruct`, like `stable_diffusion_prior`."""

    def make(cfg, reference, device, out, report):
        from ..progress import Progress

        report(Progress("prior"))
        return OracleGuidance(mesh, cfg.prior, torch.Generator().manual_seed(cfg.seed), gain=oracle_gain(cfg))

    return make
