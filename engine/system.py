"""The system: the one training loop over field, renderer and guidance, shared by every method.

A method (engine/methods: RealFusion, ConRad) picks which field the loop renders, which loss terms
count and what runs on its schedule; the loop itself is the same for all.

Each iteration renders (a) the fixed reference view, scored against the photo
and its mask, and (b) a random view, scored by the prior (SDS), plus the
regularisers. The schedule (albedo-only warm-up, coarse-to-fine over hash-grid
levels) is a pure function of the iteration, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from . import losses
from .cameras import Cameras, reference_camera, sample_random_cameras, view_names
from .config import ReconstructionConfig
from .device import to_device
from .fields.radiance_field import BackgroundField, RadianceField
from .methods import method_for
from .renderer import Lighting, OccupancyGrid, RenderOutput, VolumeRenderer, light_directions_near


class Guidance(Protocol):
    """What the loop needs from a prior: a surrogate loss whose gradient is the prior's score."""

    def sds_loss(self, images: torch.Tensor, cameras: Cameras | None = None, lighting: Lighting | None = None,
                 background: torch.Tensor | None = None, views: list[str] | None = None):
        """images [B,3,H,W] in [0,1] rendered from `cameras` under `lighting` over `background` [B,3,H,W],
        with `views` naming each one's direction prompt -> object with a scalar `.loss` whose gradient is
        the prior's."""


@dataclass
class ReferenceView:
    """The photo as the loop sees it: at the reference render size, on `device`."""

    rgb: torch.Tensor  # [H,W,3] in [0,1], the object over white
    mask: torch.Tensor  # [H,W] in [0,1]
    # the photo at its own size (ConRad samples its colors from it); None: the same as rgb / mask
    photo_rgb: torch.Tensor | None = None
    photo_mask: torch.Tensor | None = None

    @property
    def premultiplied(self) -> torch.Tensor:
        """The object's own color times its mask [H,W,3]: over white, rgb = c m + (1 - m)."""
        return (self.rgb - (1.0 - self.mask[..., None])).clamp(min=0.0)

    @classmethod
    def from_arrays(cls, rgb, mask, resolution: int, device) -> "ReferenceView":
        photo_rgb = torch.as_tensor(rgb, dtype=torch.float32)
        photo_mask = torch.as_tensor(mask, dtype=torch.float32)
        rgb_t = F.interpolate(photo_rgb.permute(2, 0, 1)[None], size=(resolution, resolution), mode="area")
        mask_t = F.interpolate(photo_mask[None, None], size=(resolution, resolution), mode="area")
        return cls(rgb_t[0].permute(1, 2, 0).to(device), mask_t[0, 0].to(device), photo_rgb.to(device),
                   photo_mask.to(device))


class ExponentialMovingAverage:
    """Shadow copy of the parameters; previews and exports use it, as the official code does.

    `update()` is called every step and averages every `every` steps. With `warmup`, the n-th average
    uses min(decay, (1 + n) / (10 + n)), as torch_ema does by default (the official code's EMA).
    """

    def __init__(self, modules: list[torch.nn.Module], decay: float, every: int = 1, warmup: bool = False):
        self.decay, self.every, self.warmup = decay, max(1, every), warmup
        self.modules = modules
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]
        self.calls = 0
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.calls += 1
        if self.calls % self.every:
            return
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        self.updates += 1
        for module, shadow in zip(self.modules, self.shadow):
            for p, s in zip(module.parameters(), shadow.parameters()):
                s.lerp_(p.detach(), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"shadow": [s.state_dict() for s in self.shadow], "calls": self.calls, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for shadow, shadow_state in zip(self.shadow, state["shadow"]):
            shadow.load_state_dict(shadow_state)
        self.calls, self.updates = state["calls"], state["updates"]


class RealFusionSystem:
    """The shared loop; `cfg.method` names the method it runs (engine.methods.METHODS)."""

    def __init__(self, cfg: ReconstructionConfig, reference: ReferenceView, guidance: Guidance,
                 device: torch.device, seed: int = 0):
        self.cfg = cfg
        self.device = device
        self.reference = reference
        self.guidance = guidance
        self.field = RadianceField(cfg.field).to(device)
        self.background = BackgroundField(cfg.field.bg_hidden_dim).to(device) if cfg.render.background == "mlp" else None
        self.renderer = VolumeRenderer(cfg.render, cfg.field.bound)
        render = cfg.render
        self.occupancy = OccupancyGrid(render.occupancy_resolution, cfg.field.bound, render.occupancy_decay,
                                       render.occupancy_threshold, render.occupancy_dilation,
                                       render.occupancy_haze_ratio).to(device)
        self.optimizer = self._make_optimizer()
        self.ema = ExponentialMovingAverage(self._modules(), cfg.fit.ema_decay, cfg.fit.ema_every, cfg.fit.ema_warmup)
        self.generator = torch.Generator().manual_seed(seed)  # cameras and lights: CPU, reproducible
        self.step = 0
        self._prepared_step = -1  # the step whose schedule state `prepare_step` has set
        self.skipped_steps = 0  # iterations whose loss or gradient was not finite (no update made)
        self.ref_camera = reference_camera(cfg.camera, cfg.render.ref_resolution, device)
        self.method = method_for(cfg.method)(self)  # last: it may wrap the field built above

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.field, self.background) if m is not None]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        fit = self.cfg.fit
        groups = [
            {"params": self.field.grid_parameters(), "lr": fit.learning_rate * fit.grid_lr_multiplier},
            {"params": self.field.mlp_parameters(), "lr": fit.learning_rate},
        ]
        if self.background is not None:
            groups.append({"params": list(self.background.parameters()), "lr": fit.learning_rate})
        return torch.optim.Adam(groups, betas=fit.betas, eps=fit.eps)

    # --- schedule: pure functions of the iteration --------------------------------------------

    def active_levels(self, step: int) -> int:
        fit = self.cfg.fit
        if step < fit.coarse_to_fine_fraction * fit.iterations:
            return self.field.n_levels - fit.coarse_levels_masked
        return self.field.n_levels

    def choose_shading(self, step: int) -> str:
        render = self.cfg.render
        if step < render.albedo_only_fraction * self.cfg.fit.iterations:
            return "albedo"
        probs = torch.tensor(render.shading_probs)
        index = int(torch.multinomial(probs, 1, generator=self.generator))
        return ("albedo", "lambertian", "textureless")[index]

    # --- one iteration ---------------------------------------------------------------------------

    def loss_weights(self, step: int) -> dict[str, float]:
        """Each term's weight at `step`: the config's, with SDS's effective schedule (`LossConfig.sds_schedule`)."""
        loss = self.cfg.loss
        names = ("image", "mask", "empty_space", "normal_smooth_2d", "entropy", "orientation")
        weights = {name: getattr(loss, name) for name in names}
        weights["sds"] = loss.sds_weight(step, self.cfg.fit.iterations)
        return self.method.loss_weights(weights)  # the method's choice of terms (ConRad: no color image loss)

    def prompt_views(self, cameras: Cameras, step: int) -> list[str] | None:
        """Each random view's direction prompt: its own on one step in `view_prompt_every`, "front" otherwise."""
        prior = self.cfg.prior
        if not prior.view_prompts:
            return None
        if step % max(1, prior.view_prompt_every) != 0:
            return ["front"] * len(cameras)
        return view_names(cameras.polar, cameras.azimuth, self.cfg.camera.ref_azimuth_deg, prior.front_angle_deg,
                          prior.overhead_angle_deg)

    def prepare_step(self) -> None:
        """The schedule's state for this step (levels, occupancy grid, the method's hook), once per step:
        a caller that reads `loss_terms` before `training_step` (bench/gradient_balance.py) does not update
        the occupancy grid twice."""
        if self._prepared_step == self.step:
            return
        self._prepared_step = self.step
        self.field.set_active_levels(self.active_levels(self.step))
        if self.step % max(1, self.cfg.render.occupancy_update_every) == 0:
            self.occupancy.update(self.field.density, self.generator)
        self.method.before_step()

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """This step's unweighted loss terms (renders the reference and a random view)."""
        cfg = self.cfg
        self.prepare_step()
        weights = self.loss_weights(self.step)
        terms: dict[str, torch.Tensor] = {}
        if weights["image"] > 0 or weights["mask"] > 0:
            if self.step % cfg.fit.ref_view_every == 0:
                terms.update(self._reference_terms())
        if cfg.loss.sds > 0:
            terms.update(self._prior_terms())
        if weights["empty_space"] > 0:
            terms["empty_space"] = self._empty_space_term()
        return terms

    def training_step(self) -> dict[str, float]:
        terms = self.loss_terms()
        weights = self.loss_weights(self.step)
        total = sum(weights[name] * value for name, value in terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        finite, values = self._read_step(total, [*terms.values(), total])
        if finite:
            self.optimizer.step()
            self.ema.update()
        else:
            # One fp16 overflow (in the VAE or UNet) would turn every weight into NaN for good:
            # drop this step's update instead, and say so in the report.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        self.step += 1
        report = dict(zip([*terms, "total"], values))
        if self.skipped_steps:
            report["skipped"] = float(self.skipped_steps)
        return report

    def _read_step(self, total: torch.Tensor, values: list[torch.Tensor]) -> tuple[bool, list[float]]:
        """Whether the loss and every gradient are finite, and the loss terms' values: one wait for the
        device for all of them (each float() or bool() would wait on its own)."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(total).all()] + [torch.isfinite(g).all() for g in grads]).all()
        read = torch.stack([finite.float()] + [value.detach().float().reshape(()) for value in values]).tolist()
        return read[0] == 1.0, read[1:]

    def _reference_terms(self) -> dict[str, torch.Tensor]:
        out = self.renderer.render(self.method.training_field(), self.background, self.ref_camera,
                                   shading="albedo", with_normals=False, stratified=True, occupancy=self.occupancy)
        return {
            "image": losses.reference_image_loss(out.rgb[0], out.opacity[0], out.background[0],
                                                 self.reference.premultiplied),
            "mask": losses.mask_loss(out.opacity[0], self.reference.mask),
        }

    def _empty_space_term(self) -> torch.Tensor:
        """Mean density at random points of the box that the occupancy grid calls empty (LossConfig.empty_space)."""
        count, bound = self.cfg.loss.empty_space_points, self.cfg.field.bound
        points = to_device(torch.rand(count, 3, generator=self.generator) * 2.0 - 1.0, self.device) * bound
        # every point evaluated and the occupied ones weighted 0: a boolean index would wait for the device
        # (where, not a product: an occupied cell's density may overflow to inf, and inf * 0 is NaN)
        empty = ~self.occupancy.is_occupied(points)
        density = self.method.training_field().density(points).float()
        return torch.where(empty, density, 0.0).sum() / empty.sum().clamp(min=1)

    def _prior_terms(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        cameras = sample_random_cameras(cfg.camera, 1, cfg.render.random_resolution, self.generator)
        views = self.prompt_views(cameras, self.step)  # from the CPU's angles: on the GPU a read would wait for it
        cameras = cameras.to(self.device)
        shading = self.choose_shading(self.step)
        light = light_directions_near(cameras, self.generator, cfg.render.light_jitter)
        out = self.renderer.render(self.method.training_field(), self.background, cameras, shading=shading,
                                   light_dir=light, with_normals=True, stratified=True, occupancy=self.occupancy)
        lighting = Lighting(shading, light if shading != "albedo" else None, cfg.render.ambient_ratio)
        background = out.background.permute(0, 3, 1, 2).detach()
        guided = self.guidance.sds_loss(out.image(), cameras, lighting, background,  # t ~ U(t_range), as the paper
                                        views=views)
        terms = {"sds": guided.loss, "entropy": losses.opacity_entropy(out.opacity)}
        if out.normal is not None:
            terms["normal_smooth_2d"] = losses.normal_smoothness_2d(out.normal, cfg.loss.normal_blur_kernel)
            terms["orientation"] = out.orientation
        return terms

    # --- looking at the result -------------------------------------------------------------------

    @torch.no_grad()
    def render(self, cameras: Cameras, shading: str = "albedo", use_ema: bool = True,
               on_white: bool = True) -> RenderOutput:
        """Render view by view with the averaged weights by default.

        `on_white` composites the object over white instead of the learned background,
        which only exists to keep the prior from painting the object onto the sky.
        """
        field, background = self.field, self.background
        if use_ema:
            field = self.ema.shadow[0]
            background = self.ema.shadow[1] if self.background is not None else None
        field.level_mask.copy_(self.field.level_mask)
        field = self.method.display_field(field)
        light = light_directions_near(cameras, spread=0.0) if shading != "albedo" else None
        outputs = [
            self.renderer.render(field, background, cameras[i], shading=shading,
                                 light_dir=None if light is None else light[i:i + 1], with_normals=True,
                                 occupancy=self.occupancy)
            for i in range(len(cameras))
        ]
        if on_white:
            outputs = [o.over_color(1.0) for o in outputs]
        return RenderOutput(
            rgb=torch.cat([o.rgb for o in outputs]),
            opacity=torch.cat([o.opacity for o in outputs]),
            depth=torch.cat([o.depth for o in outputs]),
            normal=torch.cat([o.normal for o in outputs]),
            orientation=None,
            background=torch.cat([o.background for o in outputs]),
        )

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "field": self.field.state_dict(),
            "background": None if self.background is None else self.background.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "occupancy": self.occupancy.state_dict(),
            "generator": self.generator.get_state(),
            "method": self.method.state_dict(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.field.load_state_dict(state["field"])
        if self.background is not None:
            self.background.load_state_dict(state["background"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.occupancy.load_state_dict(state["occupancy"])
        self.generator.set_state(state["generator"])
        self.method.load_state_dict(state.get("method") or {})


ReconstructionSystem = RealFusionSystem  # the loop is every method's, not RealFusion's alone
