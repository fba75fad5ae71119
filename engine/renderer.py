"""The renderer: how rays become pixels.

Rays are clipped to the field's box, sampled (stratified while training), and
composited front to back with transmittance. Besides color it returns opacity,
depth and composited normals, and applies DreamFusion's shading modes:
albedo (no lighting), lambertian (albedo times diffuse light) and textureless
(white material under the same light, which makes geometry carry the shape).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .cameras import Cameras
from .config import RenderConfig

if TYPE_CHECKING:
    from .fields.radiance_field import BackgroundField, RadianceField

SHADINGS = ("albedo", "lambertian", "textureless")


@dataclass
class Lighting:
    """How a view was shaded: what a prior needs to judge the render like with like."""

    shading: str
    light_dir: torch.Tensor | None  # [B,3] toward the light; None for albedo
    ambient: float


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [B,H,W,3] composited over the background
    opacity: torch.Tensor  # [B,H,W]
    depth: torch.Tensor  # [B,H,W], distance along the ray (0 where empty)
    normal: torch.Tensor | None  # [B,H,W,3] world-space, composited (zero where empty)
    orientation: torch.Tensor | None  # scalar: DreamFusion's penalty on normals facing away from the camera
    background: torch.Tensor  # [B,H,W,3] what the background alone shows along each ray

    def image(self) -> torch.Tensor:
        """RGB as [B,3,H,W], the layout image models take."""
        return self.rgb.permute(0, 3, 1, 2)

    def over_color(self, color: float | torch.Tensor) -> "RenderOutput":
        """The same render with the object composited over a constant `color` instead of the background."""
        background = torch.as_tensor(color, dtype=self.rgb.dtype, device=self.rgb.device).expand_as(self.rgb)
        clear = (1.0 - self.opacity)[..., None]
        rgb = self.rgb - clear * self.background + clear * background
        return dataclasses.replace(self, rgb=rgb, background=background)


def intersect_box(origins: torch.Tensor, dirs: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays [N,3] with the box [-bound, bound]^3; exit <= entry means a miss."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-bound - origins) / safe
    t1 = (bound - origins) / safe
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


def composite(sigma: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Per-sample weights [N,S] = alpha * transmittance, from densities and segment lengths."""
    alpha = 1.0 - torch.exp(-sigma * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], -1), -1)
    return alpha * transmittance[:, :-1]


def shade(albedo: torch.Tensor, normals: torch.Tensor | None, light_dir: torch.Tensor | None,
          shading: str, ambient: float) -> torch.Tensor:
    """Sample colors [N,S,3] under the given shading mode; light_dir is [N,3] (per ray)."""
    if shading == "albedo":
        return albedo
    diffuse = (normals * light_dir[:, None, :]).sum(-1, keepdim=True).clamp(min=0.0)
    light = ambient + (1.0 - ambient) * diffuse
    if shading == "lambertian":
        return albedo * light
    if shading == "textureless":
        return light.expand_as(albedo)
    raise ValueError(f"unknown shading {shading!r}; choose one of {SHADINGS}")


class VolumeRenderer:
    def __init__(self, cfg: RenderConfig, bound: float):
        self.cfg = cfg
        self.bound = bound

    def render(self, field: "RadianceField", background: "BackgroundField | None", cameras: Cameras,
               shading: str = "albedo", light_dir: torch.Tensor | None = None, with_normals: bool = True,
               ambient: float | None = None, stratified: bool = False) -> RenderOutput:
        """Render every pixel of every camera. `light_dir` is [B,3] (toward the light) for lit shadings."""
        origins, dirs = cameras.rays()
        batch, height, width = origins.shape[:3]
        origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        rays_per_view = height * width

        near, far = intersect_box(origins, dirs, self.bound)
        hit = far > near
        far = torch.where(hit, far, near + 1e-3)
        steps = self._sample_positions(near.shape[0], origins.device, stratified)
        t = near[:, None] + (far - near)[:, None] * steps  # [N,S]
        deltas = torch.cat([t[:, 1:] - t[:, :-1], (far - t[:, -1])[:, None]], -1)
        points = origins[:, None, :] + dirs[:, None, :] * t[..., None]  # [N,S,3]

        sigma, albedo = field(points.reshape(-1, 3))
        sigma = sigma.reshape(t.shape) * hit[:, None]
        albedo = albedo.reshape(*t.shape, 3)
        weights = composite(sigma, deltas)  # [N,S]

        lit = shading != "albedo"
        normals = None
        if with_normals or lit:
            normals = self._normals(field, points, weights)
        ray_light = None
        if lit:
            ray_light = light_dir.repeat_interleave(rays_per_view, 0)
        colors = shade(albedo, normals, ray_light, shading, self.cfg.ambient_ratio if ambient is None else ambient)

        opacity = weights.sum(-1)
        rgb = (weights[..., None] * colors).sum(-2)
        bg = self._background(background, dirs)
        rgb = rgb + (1.0 - opacity[:, None]) * bg
        depth = (weights * t).sum(-1)

        normal_image, orientation = None, None
        if normals is not None:
            normal_image = (weights[..., None] * normals).sum(-2)
            facing_away = (normals * dirs[:, None, :]).sum(-1).clamp(min=0.0)
            orientation = (weights.detach() * facing_away**2).sum(-1).mean()

        shape = (batch, height, width)
        return RenderOutput(
            rgb=rgb.reshape(*shape, 3),
            opacity=opacity.reshape(shape),
            depth=depth.reshape(shape),
            normal=None if normal_image is None else normal_image.reshape(*shape, 3),
            orientation=orientation,
            background=bg.reshape(*shape, 3),
        )

    def _normals(self, field: "RadianceField", points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Normals [N,S,3] at the samples that contribute to a pixel, zero elsewhere.

        Finite-difference normals cost six density lookups per sample; most samples lie in
        empty space where their weight (and so their effect on any pixel) is nil.
        """
        normals = torch.zeros_like(points)
        visible = weights.detach() > self.cfg.normal_min_weight
        if visible.any():
            normals[visible] = field.normals(points[visible], self.cfg.normal_epsilon)
        return normals

    def _sample_positions(self, n_rays: int, device, stratified: bool) -> torch.Tensor:
        """Fractions in [0,1) along each ray: bin midpoints, or uniformly jittered within bins."""
        n = self.cfg.num_samples
        base = torch.arange(n, device=device, dtype=torch.float32) / n
        offset = torch.rand(n_rays, n, device=device) if stratified else torch.full((n_rays, n), 0.5, device=device)
        return base + offset / n

    @staticmethod
    def _background(background: "BackgroundField | None", dirs: torch.Tensor) -> torch.Tensor:
        if background is None:
            return torch.ones_like(dirs)
        return background(dirs)


def light_directions_near(cameras: Cameras, generator: torch.Generator | None = None,
                          spread: float = 0.5) -> torch.Tensor:
    """Unit vectors [B,3] toward a light placed near each camera (DreamFusion), so lit sides face the view."""
    position = cameras.position
    jitter = torch.randn(position.shape, generator=generator).to(position.device) * spread
    toward = position / position.norm(dim=-1, keepdim=True) + jitter
    return F.normalize(toward, dim=-1)
