"""End to end: Blender with the add-on -> the real engine server (`realfusion serve`) -> back into Blender.

The server is a separate process on loopback running the real pipeline (tiny Stable
Diffusion from disk, CPU); Blender (the bpy module, its own environment) submits the photo
through the add-on's own job logic, follows the job, downloads mesh.glb + camera.json and
imports them. Seen through the imported camera, the mesh must cover the object's mask in
the engine's reference view.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from blender_runner import ROOT, run_blender_script
from engine.cameras import reference_camera
from engine.config import ReconstructionConfig
from synthetic_images import rgba_disc
from test_cli import TINY
from test_server import Server

# The tiny prior's guidance is noise, so the fit here learns from the photo alone (reference-view
# image and mask losses, the mask weighted up); enough steps for the silhouette to settle, a small export.
E2E_OVERRIDES = [*TINY, "field.finest_resolution=64", "render.step_size=0.05", "loss.sds=0", "loss.mask=5", "fit.iterations=200", "fit.learning_rate=0.01",
                 "fit.preview_every=50", "fit.checkpoint_every=200", "export.resolution=96", "export.texture_size=64",
                 # a 200-step reference-only fit for the add-on's placement checks, with the empty-space handling
                 # these tests were calibrated with: at the presets' haze floor (3 x the median) and empty-space
                 # term this tiny fit's mesh IoU in the window test was 0.889 (its bar: test_blender_gui.py)
                 "loss.empty_space=0", "render.occupancy_haze_ratio=1.5"]
# export.resolution=96: at 64^3 a cell of the +-1.5 box is 1/16 of the disc's radius, and the mesh's outline covered
# the mask at IoU 0.896 on a fresh setup of 2026-12-03 (deterministic; 0.924 at 96^3, and 0.865 after 300 steps at 64^3)
SIZE = 64  # silhouettes are compared at this many pixels a side


def engine_silhouette(job_folder: Path) -> np.ndarray:
    """The exported mesh seen through the engine's own reference camera (engine.cameras, in the field's
    coordinates): what Blender's camera must reproduce exactly."""
    config = ReconstructionConfig.from_dict(json.loads((job_folder / "config.json").read_text()))
    placement = json.loads((job_folder / "export.json").read_text())
    scene = trimesh.load(job_folder / "mesh.glb")
    mesh = scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(concatenate=True)
    y_up = np.asarray(mesh.vertices)
    z_up = np.stack([y_up[:, 0], -y_up[:, 2], y_up[:, 1]], axis=1)  # glTF -> Blender, as its importer does
    field_points = (z_up - np.asarray(placement["translation"])) / placement["scale"]
    origins, directions = reference_camera(config.camera, SIZE).rays()
    hits = trimesh.Trimesh(field_points, mesh.faces, process=False).ray.intersects_any(
        origins.reshape(-1, 3).numpy(), directions.reshape(-1, 3).numpy())
    return hits.reshape(SIZE, SIZE)


@pytest.mark.slow
def test_reconstruct_from_blender_imports_a_textured_mesh_under_a_matching_camera(tmp_path, tiny_sd_dir,
                                                                                   blender_python):
    server = Server(tmp_path / "jobs", tiny_sd_dir, tmp_path / "cache", tmp_path / "server.log")
    try:
        photo = rgba_disc(tmp_path / "disc.png")
        overrides = tmp_path / "overrides.json"
        overrides.write_text(json.dumps(E2E_OVERRIDES))
        report_path = tmp_path / "report.json"
        run_blender_script(ROOT / "tests" / "blender" / "e2e_reconstruct.py", f"http://127.0.0.1:{server.port}",
                           photo, report_path, overrides, server.jobs_dir, timeout=300)
        report = json.loads(report_path.read_text())
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()[-3000:]

    assert report["outcome"] == "imported", f"{report}\n{log}"
    assert report["progress"] == sorted(report["progress"]) and report["progress"][-1] == 1.0
    assert "running" in report["states"] and report["states"][-1] == "done"
    assert "fit" in report["stages"] and report["previews"] > 0
    assert report["job"]["imported"] and report["job"]["collection"] == "disc"

    # the scene: one new collection holding the mesh and the camera, nothing else
    assert sorted(report["objects"]) == [["disc", "MESH"], ["disc Camera", "CAMERA"]]
    before, after = report["scene_before"], report["scene_after"]
    assert set(after["objects"]) - set(before["objects"]) == {"disc", "disc Camera"}
    assert set(after["collections"]) - set(before["collections"]) == {"disc"}
    assert after["camera"] == "disc Camera" and report["camera"]["in_collection"]
    assert report["selected_active"] and report["mesh_faces"] > 100
    assert report["texture_size"] == [64, 64], report  # a baked texture, not vertex colors
    assert report["camera"]["background"] and report["photo_background"]  # the user's own photo
    assert report["resolution"][0] == report["resolution"][1]  # the photo is square

    # The camera is where the photo was taken from: through it Blender sees the mesh exactly as the
    # engine's reference camera does...
    blender = np.array([[c == "1" for c in row] for row in report["silhouette"]])
    engine_view = engine_silhouette(tmp_path / "jobs" / report["job"]["job_id"])
    agreement = (blender & engine_view).sum() / (blender | engine_view).sum()
    assert agreement > 0.98, agreement
    # ...and through the new camera (which frames the user's whole photo) the mesh covers the object's mask
    # in that photo, as the issue asks (0.9). This tiny fit is soft: the surface where head-on rays are half
    # opaque sits inside the mask (0.86); export matches the level to the mask instead (mesh.outline_level).
    summary = {k: v for k, v in report.items() if k not in ("states", "progress", "silhouette")}
    assert report["iou"] > 0.9, json.dumps(summary)
