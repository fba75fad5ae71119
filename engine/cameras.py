"""Pinhole cameras around the object, and the rays they shoot.

Conventions are Blender's, so a camera here is a camera there without conversion:
the world is Z-up, a camera looks down its local -Z with +Y up (OpenGL), and its
pose is a camera-to-world matrix. Angles: polar from +Z (0 = straight above),
azimuth 0 puts the camera on the -Y axis looking at the front of the object
(Blender's front view), increasing counter-clockwise seen from above.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .config import CameraConfig
from .device import to_device


@dataclass
class Cameras:
    """A batch of pinhole cameras that share one image size."""

    c2w: torch.Tensor  # [B,4,4] camera-to-world
    fovy: torch.Tensor  # [B] vertical field of view, radians
    width: int
    height: int
    polar: torch.Tensor | None = None  # [B] radians, where known (for view-dependent logic)
    azimuth: torch.Tensor | None = None  # [B] radians
    # The same cameras on the CPU, kept by `to` when they move to a GPU: what the host needs of them (the
    # renderer's sample count, the prompt's direction) without reading them back, which waits for the GPU.
    host: "Cameras | None" = dataclasses.field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def position(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    def focal_px(self) -> torch.Tensor:
        """Focal length in pixels, [B]."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)

    def __getitem__(self, index: int | slice) -> "Cameras":
        """A sub-batch; an integer keeps the batch dimension (a batch of one)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Cameras(self.c2w[index], self.fovy[index], self.width, self.height, pick(self.polar), pick(self.azimuth),
                       None if self.host is None else self.host[index])

    def with_resolution(self, width: int, height: int | None = None) -> "Cameras":
        return Cameras(self.c2w, self.fovy, width, height or width, self.polar, self.azimuth,
                       None if self.host is None else self.host.with_resolution(width, height))

    def on_host(self) -> "Cameras | None":
        """These cameras on the CPU, if they are there or kept a copy there; None otherwise."""
        return self if self.device.type == "cpu" else self.host

    def to(self, device) -> "Cameras":
        move = lambda t: None if t is None else to_device(t, device)  # noqa: E731
        host = None if torch.device(device).type == "cpu" else self.on_host()
        return Cameras(to_device(self.c2w, device), to_device(self.fovy, device), self.width, self.height,
                       move(self.polar), move(self.azimuth), host)

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """World points [N,3] -> pixel coordinates [B,N,2] (x right, y down, pixel centers at +0.5)."""
        w2c = torch.linalg.inv(self.c2w)
        homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], -1)
        cam = torch.einsum("bij,nj->bni", w2c, homogeneous)[..., :3]
        depth = -cam[..., 2].clamp(max=-1e-8)
        focal = self.focal_px()[:, None]
        x = focal * cam[..., 0] / depth + 0.5 * self.width
        y = -focal * cam[..., 1] / depth + 0.5 * self.height
        return torch.stack([x, y], -1)

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions through pixel centers, each [B,H,W,3]."""
        device = self.device
        ys, xs = torch.meshgrid(
            torch.arange(self.height, device=device, dtype=torch.float32) + 0.5,
            torch.arange(self.width, device=device, dtype=torch.float32) + 0.5,
            indexing="ij",
        )
        focal = self.focal_px()[:, None, None]
        x = (xs - 0.5 * self.width) / focal  # [B,H,W]
        y = -(ys - 0.5 * self.height) / focal
        dirs_cam = torch.stack([x, y, -torch.ones_like(x)], -1)
        dirs = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs_cam)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.c2w[:, None, None, :3, 3].expand_as(dirs)
        return origins, dirs


def spherical_to_position(polar: torch.Tensor, azimuth: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """[B] angles (radians) and radii -> [B,3] positions, Z-up, azimuth 0 on -Y."""
    return torch.stack(
        [
            radius * torch.sin(polar) * torch.sin(azimuth),
            -radius * torch.sin(polar) * torch.cos(azimuth),
            radius * torch.cos(polar),
        ],
        -1,
    )


def look_at(position: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices [B,4,4] for cameras at `position` [B,3] looking at `target`, Z-up."""
    target = torch.zeros_like(position) if target is None else target
    back = position - target
    back = back / back.norm(dim=-1, keepdim=True)
    world_up = torch.tensor([0.0, 0.0, 1.0], device=position.device).expand_as(back)
    right = torch.cross(world_up, back, dim=-1)
    # Straight above or below, "up" is undefined: fall back to +Y so the matrix stays a rotation.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback = torch.cross(torch.tensor([0.0, 1.0, 0.0], device=position.device).expand_as(back), back, dim=-1)
    right = torch.where(degenerate, fallback, right)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.cross(back, right, dim=-1)
    c2w = torch.eye(4, device=position.device).repeat(position.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = back
    c2w[:, :3, 3] = position
    return c2w


def orbit_cameras(polar_deg, azimuth_deg, radius, fovy_deg, resolution: int, device="cpu") -> Cameras:
    """Cameras on a sphere around the origin looking at it; angle arguments in degrees, scalars or sequences."""
    as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(-1)  # noqa: E731
    polar, azimuth, radius, fovy = torch.broadcast_tensors(
        torch.deg2rad(as_tensor(polar_deg)), torch.deg2rad(as_tensor(azimuth_deg)),
        as_tensor(radius), torch.deg2rad(as_tensor(fovy_deg)),
    )
    c2w = look_at(spherical_to_position(polar, azimuth, radius))
    return Cameras(c2w, fovy, resolution, resolution, polar, azimuth).to(device)  # built on the CPU: keeps `host`


def reference_camera(cfg: CameraConfig, resolution: int, device="cpu") -> Cameras:
    """The view the input photo is taken to be from (RealFusion fixes it; the object is centered in it)."""
    return orbit_cameras(cfg.ref_polar_deg, cfg.ref_azimuth_deg, cfg.ref_radius, cfg.ref_fovy_deg, resolution, device)


def turntable_cameras(cfg: CameraConfig, views: int, resolution: int, device="cpu") -> Cameras:
    """Evenly spaced views around the object at the reference elevation and distance, starting at the reference."""
    azimuths = [cfg.ref_azimuth_deg + 360.0 * i / views for i in range(views)]
    return orbit_cameras(cfg.ref_polar_deg, azimuths, cfg.ref_radius, cfg.ref_fovy_deg, resolution, device)


def sample_random_cameras(cfg: CameraConfig, batch: int, resolution: int, generator: torch.Generator,
                          device="cpu") -> Cameras:
    """Random views for the prior: radius, fovy, polar and azimuth in the configured ranges.

    With probability `uniform_sphere_rate` the direction is uniform on the sphere's upper band
    (polar from polar_range's start to `uniform_sphere_max_polar_deg`, sampled by its cosine),
    otherwise uniform in the polar angle over the whole range, which over-samples views from
    above and below: both as the official code does.
    """
    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator)

    polar_lo, polar_hi = (math.radians(v) for v in cfg.polar_range_deg)
    sphere_hi = min(polar_hi, math.radians(cfg.uniform_sphere_max_polar_deg))
    on_sphere = torch.rand(batch, generator=generator) < cfg.uniform_sphere_rate
    cos_polar = uniform(math.cos(sphere_hi), math.cos(polar_lo))
    polar = torch.where(on_sphere, torch.arccos(cos_polar.clamp(-1, 1)), uniform(polar_lo, polar_hi))
    azimuth = torch.deg2rad(uniform(*cfg.azimuth_range_deg))
    radius = uniform(*cfg.radius_range)
    fovy = torch.deg2rad(uniform(*cfg.fovy_range_deg))
    c2w = look_at(spherical_to_position(polar, azimuth, radius))
    return Cameras(c2w, fovy, resolution, resolution, polar, azimuth).to(device)


VIEWS = ("front", "side", "back", "overhead", "bottom")  # DreamFusion's direction words, as prompt suffixes


def view_names(polar: torch.Tensor, azimuth: torch.Tensor, reference_azimuth_deg: float = 0.0,
               front_angle_deg: float = 60.0, overhead_angle_deg: float = 30.0) -> list[str]:
    """The direction word of each camera [B] (radians): overhead / bottom by the polar angle first, else
    front / back / side by the azimuth relative to the reference view's (which shows the front).

    The front and back bands are `front_angle_deg` wide, centered on the reference and on its opposite.
    (The official code's front band is [0, 60) deg, off-center, which later stable-dreamfusion fixed.)
    """
    names = []
    for p, a in zip(torch.rad2deg(polar).tolist(), torch.rad2deg(azimuth).tolist()):
        turn = abs((a - reference_azimuth_deg + 180.0) % 360.0 - 180.0)  # 0 at the front, 180 behind
        if p <= overhead_angle_deg:
            names.append("overhead")
        elif p >= 180.0 - overhead_angle_deg:
            names.append("bottom")
        elif turn < front_angle_deg / 2:
            names.append("front")
        elif turn > 180.0 - front_angle_deg / 2:
            names.append("back")
        else:
            names.append("side")
    return names
