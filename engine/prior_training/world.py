"""The prior's world: a few shapes in a few colors, framed as matting frames a photo, and captions for them.

Geometry is ray cast once per shape and view by the harness's ground-truth ray caster (white albedo: only the
coverage and the normals are kept); colors, the renderer's shading modes (`engine.renderer.shade`: albedo,
lambertian, textureless) and backgrounds are then composed on the fly, so every training batch is fresh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from ..cameras import Cameras, look_at, sample_random_cameras, spherical_to_position, view_names
from ..config import CameraConfig
from ..harness.objects import _paint, _solid, frame_for_reference
from ..harness.raycast import ColoredMesh, render_ground_truth
from ..renderer import shade

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.15), "purple": (0.6, 0.2, 0.75),
}


def _sphere():
    return trimesh.creation.icosphere(subdivisions=3, radius=0.5)


def _cube():
    return trimesh.creation.box(extents=(0.8, 0.8, 0.8))


def _cylinder():
    return trimesh.creation.cylinder(radius=0.35, height=0.9, sections=48)


def _cone():
    return trimesh.creation.cone(radius=0.45, height=0.9, sections=48).apply_translation((0, 0, -0.45))


def _torus():  # standing, its hole facing the front (-Y), so the reference view sees the ring
    ring = trimesh.creation.torus(major_radius=0.35, minor_radius=0.14, major_sections=48, minor_sections=16)
    return ring.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, (1, 0, 0)))


SHAPES = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus}
HELD_OUT = ("green", "cube")  # never captioned (nor shown in its color): the textual-inversion test object
SHADING_PROBS = {"albedo": 0.4, "lambertian": 0.4, "textureless": 0.2}
AMBIENT = 0.1  # RenderConfig.ambient_ratio
LIGHT_JITTER = 2.0  # RenderConfig.light_jitter
PROMPT = "an image of a {}"  # TextualInversionConfig.prompt: the captions speak the pipeline's prompts
VIEW_SUFFIX_RATE, COLORLESS_RATE, EMPTY_RATE = 0.7, 0.15, 0.1
VOCABULARY = ("an", "image", "of", "a", "the", "photo", "object", "view", *COLORS, *SHAPES,
              "front", "side", "back", "overhead", "bottom")


@functools.lru_cache(maxsize=None)
def _framed(shape: str, camera_cfg_json: str) -> trimesh.Trimesh:
    return frame_for_reference(SHAPES[shape](), CameraConfig(**json.loads(camera_cfg_json)))


def shape_mesh(shape: str, camera_cfg: CameraConfig | None = None, color: str | None = None) -> trimesh.Trimesh:
    """The shape framed as the pipeline frames a photo (80 % of the reference view), painted `color` (or white)."""
    mesh = _framed(shape, json.dumps(dataclasses.asdict(camera_cfg or CameraConfig()))).copy()
    return _paint(mesh, _solid(COLORS[color] if color else (1.0, 1.0, 1.0)))


def caption(color: str | None, shape: str, view: str | None) -> str:
    subject = f"{color} {shape}" if color else shape
    text = PROMPT.format(subject)
    return f"{text}, {view} view" if view else text


def training_cameras(count: int, generator: torch.Generator, camera_cfg: CameraConfig,
                     resolution: int, reference_like: float = 0.25) -> Cameras:
    """The prior's random views (`sample_random_cameras`), and a share of views at the photo's distance and
    lens (radius 1.8, fov 55, elevation 0-30 deg) from any side, since textual inversion sees the photo."""
    random = sample_random_cameras(camera_cfg, count, resolution, generator)
    near = torch.rand(count, generator=generator) < reference_like
    polar = torch.deg2rad(60.0 + 30.0 * torch.rand(count, generator=generator))
    azimuth = torch.deg2rad(-180.0 + 360.0 * torch.rand(count, generator=generator))
    c2w = look_at(spherical_to_position(polar, azimuth, torch.full((count,), camera_cfg.ref_radius)))
    fovy = torch.full((count,), math.radians(camera_cfg.ref_fovy_deg))
    pick = lambda a, b: torch.where(near.view(-1, *([1] * (a.dim() - 1))), a, b)  # noqa: E731
    return Cameras(pick(c2w, random.c2w), pick(fovy, random.fovy), resolution, resolution,
                   pick(polar, random.polar), pick(azimuth, random.azimuth))


@dataclass
class GeometryBank:
    """Per shape and view: coverage [S,V,H,W] (uint8 0/1), normals [S,V,H,W,3] (fp16), camera positions
    [S,V,3] and view names, at the fine (supersampled) resolution."""

    shapes: list[str]
    coverage: torch.Tensor
    normals: torch.Tensor
    positions: torch.Tensor
    views: list[list[str]]

    def to(self, device) -> "GeometryBank":
        return GeometryBank(self.shapes, self.coverage.to(device), self.normals.to(device),
                            self.positions.to(device), self.views)


def _render_shape(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    shape, count, seed, resolution = args
    torch.set_num_threads(1)
    camera_cfg = CameraConfig()
    generator = torch.Generator().manual_seed(seed)
    cameras = training_cameras(count, generator, camera_cfg, resolution)
    mesh = ColoredMesh.from_trimesh(shape_mesh(shape, camera_cfg))
    view = render_ground_truth(mesh, cameras, supersample=1)
    names = view_names(cameras.polar, cameras.azimuth, camera_cfg.ref_azimuth_deg)
    return ((view.mask.numpy() > 0.5).astype(np.uint8), view.normal.numpy().astype(np.float16),
            cameras.position.numpy(), names)


def render_geometry(views_per_shape: int, resolution: int, seed: int, workers: int = 1,
                    chunk: int = 100, shapes: tuple[str, ...] = tuple(SHAPES)) -> GeometryBank:
    """Ray cast `shapes` from `views_per_shape` training cameras at `resolution` (the fine size)."""
    jobs = [(shape, min(chunk, views_per_shape - start), seed * 1000 + s * 100 + start // chunk, resolution)
            for s, shape in enumerate(shapes) for start in range(0, views_per_shape, chunk)]
    for shape in shapes:  # framed once here, so the forked workers share the result
        shape_mesh(shape)
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_render_shape, jobs)
    else:
        results = [_render_shape(job) for job in jobs]
    per_shape = len(results) // len(shapes)
    group = lambda i: results[i * per_shape:(i + 1) * per_shape]  # noqa: E731
    stack = lambda k: torch.stack([torch.from_numpy(np.concatenate([r[k] for r in group(i)]))  # noqa: E731
                                   for i in range(len(shapes))])
    views = [sum((r[3] for r in group(i)), []) for i in range(len(shapes))]
    return GeometryBank(list(shapes), stack(0), stack(1), stack(2).float(), views)


@dataclass
class Batch:
    images: torch.Tensor  # [B,3,h,w] in [0,1]
    captions: list[str]
    shape: torch.Tensor  # [B] index into SHAPES
    color: torch.Tensor  # [B] index into COLORS, -1 where textureless (no color shown)


def compose(bank: GeometryBank, shape: torch.Tensor, view: torch.Tensor, color: torch.Tensor, shading: list[str],
            generator: torch.Generator, downsample: int = 2) -> torch.Tensor:
    """Images [B,3,H/d,W/d]: the shapes' views in their colors under `shading` (the renderer's `shade`, a light
    near the camera as in the fit), over a white, flat or graded background, box-filtered by `downsample`."""
    device = bank.coverage.device
    batch = shape.shape[0]
    cover = bank.coverage[shape, view].float()[..., None]  # [B,H,W,1]
    normals = bank.normals[shape, view].float()
    height, width = cover.shape[1:3]
    palette = torch.tensor(list(COLORS.values()), device=device)
    jitter = (torch.rand(batch, 3, generator=generator, device=device) - 0.5) * 0.1
    albedo = (palette[color.clamp(min=0)] + jitter).clamp(0, 1)
    position = bank.positions[shape, view]
    # a light at the camera plus N(0, jitter^2), as `light_directions_near` draws it in the fit
    light = torch.nn.functional.normalize(
        position + LIGHT_JITTER * torch.randn(position.shape, generator=generator, device=device), dim=-1)
    rgb = torch.empty(batch, height, width, 3, device=device)
    for mode in SHADING_PROBS:
        rows = torch.tensor([s == mode for s in shading], device=device)
        if not rows.any():
            continue
        pixels = height * width
        a = albedo[rows].repeat_interleave(pixels, 0)[:, None]
        n = normals[rows].reshape(-1, 3)[:, None]
        lit = shade(a, n, light[rows].repeat_interleave(pixels, 0), mode, AMBIENT)[:, 0]
        rgb[rows] = lit.reshape(-1, height, width, 3)
    background = backgrounds(batch, height, width, generator, device)
    image = cover * rgb + (1 - cover) * background
    image = image.permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(image, downsample) if downsample > 1 else image


def backgrounds(batch: int, height: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
    """[B,H,W,3]: white (the photo's, half of them), or a flat or vertically graded color (what the fit's
    background MLP shows the prior)."""
    kind = torch.rand(batch, generator=generator, device=device)
    top = torch.rand(batch, 3, generator=generator, device=device)
    bottom = torch.where((kind < 0.8)[:, None], top, torch.rand(batch, 3, generator=generator, device=device))
    ramp = torch.linspace(0, 1, height, device=device)[None, :, None, None]
    graded = top[:, None, None] * (1 - ramp) + bottom[:, None, None] * ramp
    white = (kind < 0.5)[:, None, None, None]
    return torch.where(white, torch.ones_like(graded), graded).expand(batch, height, width, 3)


def sample_batch(bank: GeometryBank, batch: int, generator: torch.Generator, *, captioned: bool = True,
                 include_held_out: bool = False, shading: str | None = None) -> Batch:
    """A fresh training batch: combinations drawn uniformly from those allowed (never the held-out one in
    color unless `include_held_out`), with the caption rules of the module (color-less, view suffix, empty)."""
    device = bank.coverage.device
    cpu = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator, device=device)))
    colors, shapes = list(COLORS), bank.shapes
    held = (colors.index(HELD_OUT[0]), shapes.index(HELD_OUT[1]) if HELD_OUT[1] in shapes else -1)
    views_per_shape = bank.coverage.shape[1]
    shape_idx, color_idx, modes, captions = [], [], [], []
    while len(shape_idx) < batch:
        s = int(torch.randint(len(shapes), (1,), generator=cpu))
        c = int(torch.randint(len(colors), (1,), generator=cpu))
        mode = shading or _choice(list(SHADING_PROBS), list(SHADING_PROBS.values()), cpu)
        if (c, s) == held and mode != "textureless" and not include_held_out:
            continue
        shape_idx.append(s)
        color_idx.append(c if mode != "textureless" else -1)
        modes.append(mode)
    view_idx = torch.randint(views_per_shape, (batch,), generator=cpu)
    for s, c, v in zip(shape_idx, color_idx, view_idx.tolist()):
        u = torch.rand(3, generator=cpu).tolist()
        view = bank.views[s][v] if u[0] < VIEW_SUFFIX_RATE else None
        color = colors[c] if c >= 0 and u[1] >= COLORLESS_RATE else None
        captions.append("" if captioned and u[2] < EMPTY_RATE else caption(color, shapes[s], view))
    shape_t = torch.tensor(shape_idx, device=device)
    color_t = torch.tensor(color_idx, device=device)
    images = compose(bank, shape_t, view_idx.to(device), color_t, modes, generator)
    return Batch(images, captions, shape_t, color_t)


def _choice(options, probs, generator) -> str:
    return options[int(torch.multinomial(torch.tensor(probs), 1, generator=generator))]
