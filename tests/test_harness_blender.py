"""The harness's input photos, rendered by Blender, against the project's own ground-truth ray caster.

tests/data/harness/<object>.png are RGBA renders by Blender (the bpy module, Cycles on the CPU) of
each harness object through the reference camera, made by scripts/render_harness_inputs. The ray
caster (engine.harness.raycast) must reproduce them from the same mesh and `reference_camera`: so
the engine's camera conventions (pose, field of view, pixel centers, image orientation) and its
color handling are checked against an outside renderer, not only against themselves.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

import numpy as np
import pytest
from PIL import Image

from blender_runner import ROOT, run_blender_script
from engine.cameras import reference_camera
from engine.config import CameraConfig
from engine.harness.objects import OBJECTS, make_object
from engine.harness.raycast import ColoredMesh, embree_available, render_ground_truth

DATA = ROOT / "tests" / "data" / "harness"
RESOLUTION = 128
# Cycles integrates each pixel's area (a one-pixel box filter, 256 samples); the ray caster box-filters
# supersample^2 rays. 4 matches Blender to ~45-48 dB PSNR; without Embree the PyTorch ray caster is
# ~20x slower, so 2 (still ~40 dB, mask IoU ~0.995) keeps this test under a minute.
SUPERSAMPLE = 4 if embree_available() else 2


def load_script(path):
    """A script without the .py suffix, imported as a module."""
    loader = importlib.machinery.SourceFileLoader(path.name.replace("-", "_"), str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


render_inputs = load_script(ROOT / "scripts" / "render_harness_inputs")


def load_rgba(path) -> tuple[np.ndarray, np.ndarray]:
    """An RGBA PNG (straight alpha) -> its colors composited over white [H,W,3] and its alpha [H,W], in [0,1]."""
    rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float64) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    return rgb * alpha[..., None] + (1.0 - alpha[..., None]), alpha


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two coverage maps in [0,1] (fractional at the edges)."""
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def ground_truth(name: str, resolution: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    mesh = make_object(name, CameraConfig(), 0.8)
    view = render_ground_truth(ColoredMesh.from_trimesh(mesh), reference_camera(CameraConfig(), resolution),
                               supersample=SUPERSAMPLE)
    return view.rgb[0].double().numpy(), view.mask[0].double().numpy()


@pytest.mark.parametrize("name", list(OBJECTS))
def test_blender_render_of_the_reference_view_matches_the_ray_caster(name):
    path = DATA / f"{name}.png"
    assert path.exists(), f"{path} is missing: run scripts/render_harness_inputs"
    assert path.stat().st_size < 50_000
    blender_rgb, blender_alpha = load_rgba(path)
    assert blender_alpha.shape == (RESOLUTION, RESOLUTION)
    truth_rgb, truth_mask = ground_truth(name)

    assert psnr(blender_rgb, truth_rgb) > 30.0
    assert soft_iou(blender_alpha, truth_mask) > 0.98
    assert soft_iou(blender_alpha > 0.5, truth_mask > 0.5) > 0.98
    # Colors map 1:1 (no tone curve, no gamma slip): away from every edge, Blender's bytes are the
    # ray caster's, give or take a rounding step.
    solid = (truth_mask == 1.0) & (blender_alpha == 1.0)
    solid &= np.all([np.roll(solid, shift, axis) for shift in (-1, 1) for axis in (0, 1)], axis=0)
    byte_error = np.abs(np.round(blender_rgb[solid] * 255) - np.round(truth_rgb[solid] * 255))
    assert np.mean(byte_error <= 1) > 0.95


def test_blender_regenerates_the_committed_render(tmp_path, blender_python):
    """The committed PNG is what scripts/render_harness_inputs makes now (the mug: gradient faces, a handle)."""
    mesh_path, camera_path = render_inputs.export_scene("mug", tmp_path, RESOLUTION)
    output = tmp_path / "mug.png"
    run_blender_script(render_inputs.BLENDER_SCRIPT, mesh_path, camera_path, output,
                       "--samples", str(render_inputs.SAMPLES), timeout=120)
    fresh_rgb, fresh_alpha = load_rgba(output)
    committed_rgb, committed_alpha = load_rgba(DATA / "mug.png")
    assert psnr(fresh_rgb, committed_rgb) > 35.0
    assert soft_iou(fresh_alpha, committed_alpha) > 0.99
