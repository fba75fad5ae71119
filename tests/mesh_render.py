"""Moved to `engine.harness.mesh_render` (the evaluation renders the exported mesh with it too); kept for imports."""

from engine.harness.mesh_render import render_mesh, sample_bilinear  # noqa: F401
from engine.harness.metrics import psnr  # noqa: F401
