"""ConRad's image-constrained field: the photo's colors on everything the photo sees.

ConRad (Purushwalkam & Naik, 2023) wraps a radiance field F_theta with the reference camera,
the photo I (composited over its background, white) and a depth map d_ref of the visible surface:

    F(x) = (sigma_theta(x), I(T_ref(x)))   if z(x) < d_ref(T_ref(x)) + delta
           F_theta(x)                      otherwise

where T_ref(x) is x's projection into the photo and z(x) its depth along the reference camera's
axis. The field decides where the surface is (density is always its own); every point on or in
front of the visible surface shows the photo's pixel, so the reference view matches the photo by
construction, and only what the photo cannot see keeps the field's own albedo. Pixels outside the
object's mask carry the photo's background, so a stray density there draws background.

d_ref is not known: `estimate_depth` reads it off the field along each reference ray, where the
ray's transmittance, normalised between its entry into and its exit from the box, falls to 0.05.
`ConstrainedField.refresh_depth` does that for its own field (the fit refreshes it on a schedule).

The wrapper is a field for every consumer (renderer, previews, turntable, the export's density grid
and texture bake), so the mesh's front is textured with the photo's own pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cameras import Cameras
from ..renderer import intersect_box

EMPTY_DEPTH = 1.0e4  # d_ref of a ray that meets nothing: everything along it is in front (takes the photo)
MIN_OPACITY = 1e-3  # a ray less opaque than this meets nothing (normalising its transmittance would be noise)
POINTS_PER_CHUNK = 1 << 18  # density queries per batch while estimating depth
OUTSIDE_MASK = ("background", "field")  # what in-front points take where the photo shows no object
MIN_ALPHA = 2.0 / 255.0  # less of the object than this in a pixel: its color cannot be told apart, take the background


def object_color(photo: torch.Tensor, mask: torch.Tensor, background: float = 1.0) -> torch.Tensor:
    """The object's own color [1,3,H,W] under a photo [1,3,H,W] composited over `background` with alpha `mask`
    [1,1,H,W]; the background where there is (next to) no object.

    At the outline a pixel is part object, part background: a field drawing it with opacity alpha must color
    it with the object's own color, not the blend, for the render (alpha c + (1 - alpha) background) to be the
    photo's pixel again.
    """
    alpha = mask.clamp(0.0, 1.0)
    own = ((photo - (1.0 - alpha) * background) / alpha.clamp(min=MIN_ALPHA)).clamp(0.0, 1.0)
    return torch.where(alpha >= MIN_ALPHA, own, torch.full_like(own, background))


@torch.no_grad()
def estimate_depth(field, camera: Cameras, bound: float, num_samples: int,
                   threshold: float = 0.05) -> torch.Tensor:
    """Depth [H,W] along the camera's axis of the surface `field` shows through each pixel of `camera[0]`.

    Each ray is cut into `num_samples` equal intervals between where it enters and leaves the box
    [-bound, bound]^3; the density is read at their midpoints (constant per interval), which gives the
    transmittance T at the interval ends. Normalised between entry and exit, Tn = (T - T_exit) / (1 - T_exit)
    falls from 1 to 0; the surface is where it crosses `threshold` (linear between interval ends). Rays
    that miss the box or are (nearly) transparent get EMPTY_DEPTH.
    """
    origins, dirs = (r[0].reshape(-1, 3) for r in camera[0].rays())
    near, far = intersect_box(origins, dirs, bound)
    hit = far > near
    t_hit = torch.full_like(near, EMPTY_DEPTH)
    rays = torch.nonzero(hit)[:, 0]
    fractions = torch.linspace(0.0, 1.0, num_samples + 1, device=origins.device)
    chunk = max(1, POINTS_PER_CHUNK // num_samples)
    for start in range(0, len(rays), chunk):
        r = rays[start:start + chunk]
        length = far[r] - near[r]
        edges = near[r, None] + length[:, None] * fractions  # [R,S+1]
        middles = 0.5 * (edges[:, 1:] + edges[:, :-1])
        points = origins[r, None] + dirs[r, None] * middles[..., None]
        sigma = field.density(points.reshape(-1, 3)).float().reshape(len(r), num_samples)
        optical = torch.cat([torch.zeros_like(sigma[:, :1]),
                             torch.cumsum(sigma.clamp(min=0.0) * (length / num_samples)[:, None], -1)], -1)
        transmittance = torch.exp(-optical)  # [R,S+1] at the interval ends
        t_exit = transmittance[:, -1:]
        opacity = 1.0 - t_exit
        normalised = (transmittance - t_exit) / opacity.clamp(min=1e-12)
        k = (normalised <= threshold).float().argmax(-1).clamp(min=1)  # first end at or below (the exit always is)
        before, after = normalised.gather(1, (k - 1)[:, None])[:, 0], normalised.gather(1, k[:, None])[:, 0]
        share = ((before - threshold) / (before - after).clamp(min=1e-12)).clamp(0.0, 1.0)
        start_t = edges.gather(1, (k - 1)[:, None])[:, 0]
        t = start_t + share * length / num_samples
        t_hit[r] = torch.where(opacity[:, 0] >= MIN_OPACITY, t, torch.full_like(t, EMPTY_DEPTH))
    forward = -camera.c2w[0, :3, 2]
    axial = torch.where(t_hit < EMPTY_DEPTH, t_hit * (dirs @ forward), t_hit)  # distance along the ray -> z
    return axial.reshape(camera.height, camera.width)


class ConstrainedField(nn.Module):
    """A field whose color, in front of the photo's visible surface, is the photo's (see the module's text).

    `rgb` [H,W,3] is the photo composited over its (white) background and `mask` [H,W] the object's alpha:
    a point takes the object's own color there (`object_color`), the background outside the object; `c2w` [4,4] and `fovy` (radians) the
    reference camera, `depth` [h,w] the surface depth along that camera's axis, at any resolution (None:
    not estimated yet, nothing is constrained until `refresh_depth` or `set_depth`).
    """

    def __init__(self, field: nn.Module, c2w: torch.Tensor, fovy: float, rgb: torch.Tensor, mask: torch.Tensor,
                 delta: float, depth: torch.Tensor | None = None, bound: float | None = None,
                 outside_mask: str = "background"):
        super().__init__()
        if outside_mask not in OUTSIDE_MASK:
            raise ValueError(f"outside_mask={outside_mask!r} is not one of {OUTSIDE_MASK}")
        self.field = field
        self.delta = float(delta)
        self.outside_mask = outside_mask
        self.fovy = float(fovy)
        self.bound = float(bound if bound is not None else field.bound)
        device = next(iter(field.parameters()), torch.empty(0)).device
        c2w = torch.as_tensor(c2w, dtype=torch.float32, device=device)
        self.register_buffer("c2w", c2w)
        self.register_buffer("w2c", torch.linalg.inv(c2w))
        self.register_buffer("photo", torch.as_tensor(rgb, dtype=torch.float32, device=device).permute(2, 0, 1)[None])
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32, device=device)[None, None])
        self.register_buffer("color", object_color(self.photo, self.mask))
        self.register_buffer("depth", torch.full((1, 1, 1, 1), -EMPTY_DEPTH, device=device))
        self.depth_step = -1  # the fit iteration the depth was estimated at (-1: never)
        if depth is not None:
            self.set_depth(depth)

    @property
    def height(self) -> int:
        return self.photo.shape[-2]

    @property
    def width(self) -> int:
        return self.photo.shape[-1]

    def camera(self, resolution: int | None = None) -> Cameras:
        """The reference camera, at the photo's size or `resolution` pixels a side."""
        height = resolution or self.height
        width = resolution or self.width
        return Cameras(self.c2w[None], torch.tensor([self.fovy], device=self.c2w.device), width, height)

    def set_depth(self, depth: torch.Tensor, step: int = -1) -> None:
        self.depth = torch.as_tensor(depth, dtype=torch.float32, device=self.c2w.device)[None, None].contiguous()
        self.depth_step = step

    @torch.no_grad()
    def refresh_depth(self, resolution: int, num_samples: int, threshold: float = 0.05, step: int = -1,
                      source: nn.Module | None = None) -> None:
        """Re-estimate the visible surface's depth from the wrapped field as it is now (or from `source`, the
        same field as a renderer sees it, e.g. through an occupancy grid)."""
        depth = estimate_depth(source if source is not None else self.field, self.camera(resolution), self.bound,
                               num_samples, threshold)
        self.set_depth(depth, step)

    # --- where a point falls in the photo ----------------------------------------------------------

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Points [N,3] -> grid_sample coordinates [N,2] in the photo ((-1,-1): its top-left corner,
        align_corners=False), depth [N] along the camera's axis, and whether the photo sees them [N]."""
        cam = x @ self.w2c[:3, :3].T + self.w2c[:3, 3]
        z = -cam[:, 2]
        safe = z.clamp(min=1e-6)
        tan = math.tan(0.5 * self.fovy)
        gx = cam[:, 0] / (safe * tan) * (self.height / self.width)
        gy = -cam[:, 1] / (safe * tan)
        coords = torch.stack([gx, gy], -1)
        seen = (z > 1e-6) & (gx.abs() <= 1.0) & (gy.abs() <= 1.0)
        return coords, z, seen

    @staticmethod
    def _sample(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Bilinear samples [N,C] of image [1,C,H,W] at grid_sample coordinates [N,2]."""
        grid = coords.to(image.dtype)[None, None]  # [1,1,N,2]
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T

    def surface_depth(self, coords: torch.Tensor) -> torch.Tensor:
        """The visible surface's depth [N] at grid_sample coordinates [N,2]: the nearest of the depth-map pixels
        that bilinear filtering would blend (those with a weight above zero).

        Blending depths across an outline (the surface next to a ray that meets nothing, EMPTY_DEPTH) or across
        a self-occlusion edge puts the "surface" far behind both sides, so hidden points there (the object's
        sides and back, seen at a grazing angle from the reference camera) took the photo's outline and
        background colors; the nearest depth keeps them the field's own.
        """
        depth = self.depth[0, 0]
        h, w = depth.shape
        px = ((coords[:, 0].float() + 1.0) * w - 1.0) * 0.5  # pixel index units, centers at integers
        py = ((coords[:, 1].float() + 1.0) * h - 1.0) * 0.5
        x0, y0 = px.floor(), py.floor()
        fx, fy = px - x0, py - y0
        nearest = torch.full_like(px, float("inf"))
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            for dy, wy in ((0, 1.0 - fy), (1, fy)):
                xi = (x0.long() + dx).clamp(0, w - 1)
                yi = (y0.long() + dy).clamp(0, h - 1)
                value = torch.where((wx > 0) & (wy > 0), depth[yi, xi], torch.full_like(px, float("inf")))
                nearest = torch.minimum(nearest, value)
        return nearest

    def with_depth(self, depth: torch.Tensor) -> "ConstrainedField":
        """The same field, photo and camera with another depth map of the visible surface (e.g. the exported
        mesh's own, so its texture takes the photo wherever the mesh itself is seen)."""
        state = {**self.saved_state(), "depth": depth}
        other = ConstrainedField.from_saved_state(self.field, state)
        return other.to(self.c2w.device)

    def constrained(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(whether each point [N] takes the photo's color, that color [N,3])."""
        coords, z, seen = self.project(x)
        surface = self.surface_depth(coords)
        in_front = seen & (z < surface + self.delta)
        if self.outside_mask == "field":
            in_front = in_front & (self._sample(self.mask, coords)[:, 0] >= MIN_ALPHA)
        return in_front, self._sample(self.color, coords)

    # --- the field's interface ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, albedo = self.field(x)
        in_front, color = self.constrained(x.detach())
        return sigma, torch.where(in_front[:, None], color.to(albedo.dtype), albedo)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.density(x)

    def normals(self, x: torch.Tensor, epsilon: float) -> torch.Tensor:
        return self.field.normals(x, epsilon)

    # --- what field.pt keeps, so the export rebuilds the very same field ---------------------------

    def saved_state(self) -> dict:
        return {"c2w": self.c2w.cpu(), "fovy": self.fovy, "rgb": self.photo[0].permute(1, 2, 0).cpu(),
                "mask": self.mask[0, 0].cpu(), "depth": self.depth[0, 0].cpu(), "delta": self.delta,
                "bound": self.bound, "outside_mask": self.outside_mask}

    @classmethod
    def from_saved_state(cls, field: nn.Module, state: dict) -> "ConstrainedField":
        return cls(field, state["c2w"], state["fovy"], state["rgb"], state["mask"], state["delta"],
                   depth=state["depth"], bound=state["bound"], outside_mask=state.get("outside_mask", "background"))
