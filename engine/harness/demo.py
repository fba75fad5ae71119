"""`realfusion demo`: the whole pipeline, offline, on a synthetic object with the oracle prior.

It photographs a bundled object from the reference camera (RGBA, so matting uses the
alpha), reconstructs it with `reconstruct` exactly as a real photo (same losses,
schedule, renderer and export), then scores the result against the ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..cameras import reference_camera
from ..config import ReconstructionConfig
from ..outputs import atomic_write_bytes, to_uint8
from .objects import make_object, outer_surface_points
from .oracle import oracle_prior
from .raycast import ColoredMesh, render_ground_truth

GROUND_TRUTH_DIR = "ground_truth"


def photograph(mesh, cfg: ReconstructionConfig, supersample: int = 3) -> np.ndarray:
    """RGBA uint8 [S,S,4] of the object from the reference camera at the matting size, anti-aliased."""
    camera = reference_camera(cfg.camera, cfg.matting.image_size)
    view = render_ground_truth(ColoredMesh.from_trimesh(mesh), camera, supersample)
    rgb = view.rgb[0].numpy()
    alpha = view.mask[0].numpy()
    # The renderer composites over white; un-composite so the RGBA has the object's own colors.
    color = np.where(alpha[..., None] > 1e-3, (rgb - (1 - alpha[..., None])) / np.maximum(alpha[..., None], 1e-3), 1)
    return np.dstack([to_uint8(color), to_uint8(alpha)])


def write_ground_truth(mesh, outdir: Path) -> Path:
    """The true mesh (PLY with vertex colors) and a surface point cloud, for `realfusion eval`."""
    folder = Path(outdir) / GROUND_TRUTH_DIR
    atomic_write_bytes(folder / "mesh.ply", mesh.export(file_type="ply"))
    buffer = _npy_bytes(outer_surface_points(mesh))
    atomic_write_bytes(folder / "points.npy", buffer)
    return folder


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def run_demo(outdir: Path, cfg: ReconstructionConfig, object_name: str = "figure", device: str | None = None,
             report=None, resume: bool = True):
    from ..pipeline import reconstruct

    outdir = Path(outdir)
    mesh = make_object(object_name, cfg.camera, cfg.matting.object_fraction)
    outdir.mkdir(parents=True, exist_ok=True)
    photo_path = outdir / "input.png"
    Image.fromarray(photograph(mesh, cfg)).save(photo_path)
    write_ground_truth(mesh, outdir)
    return reconstruct(photo_path, outdir, cfg, device=device, prior=oracle_prior(ColoredMesh.from_trimesh(mesh)),
                       report=report, resume=resume)
