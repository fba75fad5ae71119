"""Rendering a textured triangle mesh with the engine's cameras (numpy z-buffer), to compare with field renders.

Used by `realfusion eval` (the exported mesh seen from the reference and turntable views) and by the
export tests. Albedo only, no lighting, no anti-aliasing: render at a multiple of the size and
`box_downsample` for smooth edges.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cameras import Cameras
from ..export.texture import rasterize


def render_mesh(vertices: np.ndarray, faces: np.ndarray, cameras: Cameras, uv: np.ndarray | None = None,
                texture: np.ndarray | None = None, colors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Albedo images [B,H,W,3] over white and silhouettes [B,H,W] of a mesh in the cameras' world.

    `uv` is in glTF convention ((0, 0) at the texture's top-left), sampled bilinearly from `texture`
    [h,w,3] in [0,1]; or `colors` [V,3] are interpolated. Barycentrics are perspective-correct.
    """
    height, width = cameras.height, cameras.width
    points = torch.as_tensor(vertices, dtype=torch.float32)
    pixels = cameras.project(points).numpy()  # [B,V,2]
    w2c = torch.linalg.inv(cameras.c2w)
    depth = -(torch.einsum("bij,nj->bni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3])[..., 2].numpy()
    images, masks = [], []
    for b in range(len(cameras)):
        fragments = rasterize(pixels[b][faces], width, height)
        inverse_depth = fragments.barycentric / depth[b][faces[fragments.face]]  # [N,3]
        z = 1.0 / inverse_depth.sum(-1)
        weights = inverse_depth * z[:, None]
        nearest = np.lexsort((z, fragments.pixel))  # by pixel, then depth
        first = nearest[np.r_[True, fragments.pixel[nearest][1:] != fragments.pixel[nearest][:-1]]]
        corners = faces[fragments.face[first]]
        if texture is not None:
            coords = np.einsum("nk,nkc->nc", weights[first], uv[corners])
            color = sample_bilinear(texture, coords)
        else:
            color = np.einsum("nk,nkc->nc", weights[first], colors[corners])
        image = np.ones((height * width, 3))
        image[fragments.pixel[first]] = color
        mask = np.zeros(height * width, bool)
        mask[fragments.pixel[first]] = True
        images.append(image.reshape(height, width, 3))
        masks.append(mask.reshape(height, width))
    return np.stack(images), np.stack(masks)


def sample_bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Texture [h,w,C] at glTF uv [N,2] (texel centers at (i + 0.5) / size), clamped at the borders."""
    h, w = texture.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip(uv[:, 1] * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx
    bottom = texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def box_downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """[B,H,W,...] averaged over factor x factor blocks: [B,H/factor,W/factor,...]."""
    if factor == 1:
        return images
    b, h, w = images.shape[:3]
    blocks = images.reshape(b, h // factor, factor, w // factor, factor, *images.shape[3:])
    return blocks.mean(axis=(2, 4))
