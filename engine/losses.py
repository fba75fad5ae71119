"""Losses of the field fit, besides the prior's (see engine.guidance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_image_loss(rgb: torch.Tensor, opacity: torch.Tensor, background: torch.Tensor,
                         target_premultiplied: torch.Tensor) -> torch.Tensor:
    """MSE between the rendered reference view and the photo, both premultiplied by their alpha.

    rgb, background: [H,W,3] (the render composited over its background), opacity: [H,W],
    target_premultiplied: [H,W,3] = the photo's own color times its mask. The render's own
    color, without the background, is rgb - (1 - opacity) * background. Comparing premultiplied
    colors is exact at a soft edge (a pixel half covered by color c is c/2 in both) and never asks
    the object to paint the background; the mask loss sees to the opacity. The official code
    compares (render over background) * mask with color * mask, which equals this inside the
    object and mixes the background into its soft edges.
    """
    own = rgb - (1.0 - opacity[..., None]) * background
    return F.mse_loss(own, target_premultiplied)


def mask_loss(opacity: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(opacity, target_mask)


def gaussian_kernel(size: int, sigma: float | None = None, device=None) -> torch.Tensor:
    sigma = sigma if sigma is not None else 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's default for a size
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_blur(images: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] with replicate padding."""
    channels = images.shape[1]
    g = gaussian_kernel(size, device=images.device)
    horizontal = g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
    vertical = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1)
    pad = size // 2
    x = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    x = F.conv2d(x, horizontal, groups=channels)
    return F.conv2d(x, vertical, groups=channels)


def normal_smoothness_2d(normal_image: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """RealFusion's 2D smoothness: pull the rendered normal map toward its own blurred copy.

    normal_image: [B,H,W,3]. The blurred copy is a fixed target (no gradient), so the
    loss smooths high-frequency normal noise without shrinking the map.
    """
    normals = normal_image.permute(0, 3, 1, 2)
    target = gaussian_blur(normals.detach(), kernel_size)
    return F.mse_loss(normals, target)


def opacity_entropy(opacity: torch.Tensor) -> torch.Tensor:
    """Binary entropy (in bits, as the official code) of pixel opacity: pushes every pixel to be clearly
    object or clearly background."""
    a = opacity.clamp(1e-5, 1.0 - 1e-5)
    return -(a * torch.log2(a) + (1.0 - a) * torch.log2(1.0 - a)).mean()
