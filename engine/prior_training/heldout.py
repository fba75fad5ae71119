"""The held-out object as a harness object: the combination the prior never saw captioned (a green cube),
photographed from the reference camera as `realfusion demo` photographs its objects, with its ground truth
(mesh.ply + points.npy) for `realfusion eval --ground-truth`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from ..config import ReconstructionConfig
from ..harness.demo import photograph, write_ground_truth
from .world import HELD_OUT, shape_mesh


def held_out_mesh(cfg: ReconstructionConfig | None = None) -> trimesh.Trimesh:
    """Subdivided so the ground truth's surface points and normals are as fine as the harness objects'."""
    color, shape = HELD_OUT
    mesh = shape_mesh(shape, (cfg or ReconstructionConfig()).camera, color)
    if len(mesh.faces) < 2000:
        rgb = np.asarray(mesh.visual.vertex_colors)[0]
        mesh = mesh.subdivide().subdivide().subdivide()
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.tile(rgb, (len(mesh.vertices), 1)))
    return mesh


def write_photo(outdir: Path, cfg: ReconstructionConfig | None = None) -> Path:
    """OUTDIR/input.png (RGBA, the reference view at the matting size) and OUTDIR/ground_truth/; returns the photo."""
    cfg = cfg or ReconstructionConfig()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    mesh = held_out_mesh(cfg)
    path = outdir / "input.png"
    Image.fromarray(photograph(mesh, cfg)).save(path)
    write_ground_truth(mesh, outdir)
    return path
