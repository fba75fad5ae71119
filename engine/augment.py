"""Augmentations for single-image textual inversion (RealFusion).

With only one photo, textual inversion learns an embedding for the object rather than for
that exact picture by seeing it re-framed, rotated, re-colored, blurred and mirrored.
The official code (lukemelas/realfusion, textual-inversion/textual_inversion.py) does this
with torchvision, which cannot be installed beside our torch, so here it is in plain torch:
the geometry (rotation, resized crop) is one affine warp, sampled once, filled with white
because the object sits on white.

Two sets of constants (`AUGMENTATIONS`): "official" follows the official pipeline (a rotated
view is center-cropped to 5/6 of the output size from a 5/4 working size, i.e. zoomed in 1.5x;
color jitter 0.04 for all four); "gentle" fills the rotation with white instead of zooming
(white on a white background leaves no border, and the object keeps its edges) and jitters
colors harder (0.2/0.2/0.2/0.05). In both, a crop larger than the image (scale > 1) zooms out,
where torchvision would fall back to the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device import to_device

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's grayscale


@dataclass
class AugmentationConfig:
    working_scale: float = 5 / 4  # resize to this x resolution before warping (official: 5/4)
    rotation_p: float = 0.75
    rotation_degrees: float = 10.0
    rotation_zoom: float = 1.0  # a rotated view is zoomed in by this (official: (5/4) / (5/6) = 1.5)
    crop_scale: tuple[float, float] = (0.85, 1.15)  # crop area as a fraction of the image area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio, as torchvision's default
    color_jitter_p: float = 0.75
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05  # fraction of a full turn of the hue circle
    grayscale_p: float = 0.1
    blur_p: float = 0.1
    blur_kernel: int = 5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5


AUGMENTATIONS: dict[str, AugmentationConfig] = {
    "official": AugmentationConfig(rotation_zoom=1.5, brightness=0.04, contrast=0.04, saturation=0.04, hue=0.04),
    "gentle": AugmentationConfig(),
}


def augmentation_config(name: str) -> AugmentationConfig:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentations {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]


def augment(
    image: torch.Tensor, resolution: int, generator: torch.Generator, cfg: AugmentationConfig | None = None
) -> torch.Tensor:
    """[3,H,W] in [0,1] (object on white) -> one random augmentation, [3,resolution,resolution] in [0,1].

    Runs on the image's device (the random draws come from `generator`, a CPU generator, so a GPU
    image gives the same augmentation as a CPU one, up to rounding)."""
    cfg = cfg or AugmentationConfig()
    return _augment_resized(resize_short_side(image, round(resolution * cfg.working_scale)), resolution, generator,
                            cfg)


def _augment_resized(image: torch.Tensor, resolution: int, generator: torch.Generator,
                     cfg: AugmentationConfig) -> torch.Tensor:
    """`augment` after its (deterministic) resize to the working size."""
    warp = random_resized_crop(image.shape[-2:], cfg, generator)
    if _chance(cfg.rotation_p, generator):
        zoom = torch.diag(torch.tensor([1.0 / cfg.rotation_zoom, 1.0 / cfg.rotation_zoom, 1.0]))
        warp = random_rotation(image.shape[-2:], cfg, generator) @ zoom @ warp
    image = warp_over_white(image, warp, resolution)
    if _chance(cfg.color_jitter_p, generator):
        image = color_jitter(image, cfg, generator)
    if _chance(cfg.grayscale_p, generator):
        image = grayscale(image)
    if _chance(cfg.blur_p, generator):
        image = gaussian_blur(image, cfg.blur_kernel, _uniform(*cfg.blur_sigma, generator))
    if _chance(cfg.flip_p, generator):
        image = image.flip(-1)
    return image.clamp(0.0, 1.0)


def augment_batch(
    image: torch.Tensor,
    resolution: int,
    batch_size: int,
    generator: torch.Generator,
    cfg: AugmentationConfig | None = None,
) -> torch.Tensor:
    """[B,3,resolution,resolution]: `batch_size` independent augmentations of one image, on its device.

    The same as stacking `batch_size` calls of `augment` (same draws, same order), with the resize
    to the working size done once instead of once per view."""
    cfg = cfg or AugmentationConfig()
    resized = resize_short_side(image, round(resolution * cfg.working_scale))
    return torch.stack([_augment_resized(resized, resolution, generator, cfg) for _ in range(batch_size)])


# ---------------------------------------------------------------- randomness


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(p: float, generator: torch.Generator) -> bool:
    return torch.rand((), generator=generator).item() < p


# ---------------------------------------------------------------- geometry


def resize_short_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased resize so the short side is `size`: grid_sample does not antialias, so
    the later warp should only ever shrink a little (from 5/4 of the output size)."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    if target == (height, width):
        return image
    return F.interpolate(image[None], size=target, mode="bilinear", antialias=True, align_corners=False)[0]


def random_resized_crop(shape, cfg: AugmentationConfig, generator: torch.Generator) -> torch.Tensor:
    """3x3 map from output to source coordinates (normalized, [-1,1]) for a random crop.

    The crop covers `scale` of the image area with aspect `ratio` (log-uniform, as torchvision),
    placed so that it stays inside the image, or, when larger, the image stays inside it.
    """
    height, width = shape
    area = _uniform(*cfg.crop_scale, generator) * height * width
    ratio = math.exp(_uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator))
    half_x = math.sqrt(area * ratio) / width  # half-extent in normalized units (the image spans 2)
    half_y = math.sqrt(area / ratio) / height
    center_x = _uniform(-1.0, 1.0, generator) * abs(1.0 - half_x)
    center_y = _uniform(-1.0, 1.0, generator) * abs(1.0 - half_y)
    return torch.tensor([[half_x, 0.0, center_x], [0.0, half_y, center_y], [0.0, 0.0, 1.0]])


def random_rotation(shape, cfg: AugmentationConfig, generator: torch.Generator) -> torch.Tensor:
    """3x3 map, in normalized coordinates, that turns the image by a random angle about its center."""
    height, width = shape
    angle = math.radians(_uniform(-cfg.rotation_degrees, cfg.rotation_degrees, generator))
    cos, sin = math.cos(angle), math.sin(angle)
    # rotate in pixel units; normalized x and y have different units on a non-square image
    to_pixels = torch.diag(torch.tensor([width / 2, height / 2, 1.0]))
    rotate = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    return torch.linalg.inv(to_pixels) @ rotate @ to_pixels


def warp_over_white(image: torch.Tensor, warp: torch.Tensor, resolution: int) -> torch.Tensor:
    """Sample `image` at `warp` (output -> source) into a square; outside the image is white."""
    theta = to_device(warp[:2].to(dtype=image.dtype), image.device)[None]
    grid = F.affine_grid(theta, [1, image.shape[0], resolution, resolution], align_corners=False)
    # grid_sample pads with zeros: sample (image - 1) so that the padding comes out as white
    sampled = F.grid_sample(image[None] - 1.0, grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    return sampled[0] + 1.0


# ---------------------------------------------------------------- color


def color_jitter(image: torch.Tensor, cfg: AugmentationConfig, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each by a random amount, in random order (as torchvision)."""
    steps = [
        lambda x: adjust_brightness(x, _uniform(1 - cfg.brightness, 1 + cfg.brightness, generator)),
        lambda x: adjust_contrast(x, _uniform(1 - cfg.contrast, 1 + cfg.contrast, generator)),
        lambda x: adjust_saturation(x, _uniform(1 - cfg.saturation, 1 + cfg.saturation, generator)),
        lambda x: adjust_hue(x, _uniform(-cfg.hue, cfg.hue, generator)),
    ]
    for index in torch.randperm(len(steps), generator=generator).tolist():
        image = steps[index](image).clamp(0.0, 1.0)
    return image


def _gray(image: torch.Tensor) -> torch.Tensor:
    weights = to_device(torch.tensor(_LUMA, dtype=image.dtype), image.device)
    return torch.einsum("c,chw->hw", weights, image)[None]


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    return image * factor


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    mean = _gray(image).mean()
    return (image - mean) * factor + mean


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    gray = _gray(image)
    return (image - gray) * factor + gray


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Turn the hue by `shift` of a full turn: a rotation of the chroma plane in YIQ, a cheap,
    smooth stand-in for torchvision's HSV round trip at these small angles."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=image.dtype)
    angle = 2 * math.pi * shift
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], dtype=image.dtype)
    matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq  # on the CPU: a 3 x 3 inverse on a GPU waits for it
    return torch.einsum("dc,chw->dhw", to_device(matrix, image.device), image)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    return _gray(image).expand_as(image)


# ---------------------------------------------------------------- blur


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur; edges reflect, so the white border stays white."""
    offsets = torch.arange(kernel_size, device=image.device, dtype=image.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    pad = kernel_size // 2
    x = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x[0]
