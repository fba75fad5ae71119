"""Small synthetic input photos for tests that run the whole pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def rgba_disc(path: Path, size: int = 96, radius: float = 0.3) -> Path:
    """An RGBA photo of a two-tone disc (red left, blue right) on a transparent background."""
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    inside = xs**2 + ys**2 < radius**2
    pixels = np.zeros((size, size, 4), np.uint8)
    pixels[..., :3] = np.where((xs < 0)[..., None], (200, 40, 40), (40, 60, 200))
    pixels[..., 3] = inside * 255
    Image.fromarray(pixels).save(path)
    return path
