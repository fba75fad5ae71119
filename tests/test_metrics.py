"""Evaluation metrics against closed forms, and `realfusion eval` on a reconstruction that is the ground truth."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from engine.cameras import reference_camera
from engine.cli import main
from engine.config import ReconstructionConfig
from engine.errors import EngineError
from engine.export import CAMERA_NODE, MESH_NODE
from engine.export.gltf import CameraData, MeshData, glb_bytes
from engine.export.placement import Placement, camera_description
from engine.export.texture import bake_albedo, unwrap
from engine.harness import metrics
from engine.harness.demo import photograph, write_ground_truth
from engine.harness.evaluate import EVAL_FILE, SHEET_FILE, evaluate
from engine.harness.objects import make_object
from engine.outputs import to_uint8

POINTS = 5000


def cloud(mesh: trimesh.Trimesh, seed: int = 0) -> np.ndarray:
    return metrics.surface_points(mesh, POINTS, seed).astype(np.float64)


@pytest.fixture(scope="module")
def box_cloud() -> np.ndarray:
    return cloud(trimesh.creation.box(extents=(0.9, 0.6, 0.5)))


# --------------------------------------------------------------------------------------------- geometry


def test_a_cloud_scores_perfectly_against_itself(box_cloud):
    assert metrics.fscore(box_cloud, box_cloud, 0.05) == 1.0
    assert metrics.chamfer(box_cloud, box_cloud) == 0.0
    score = metrics.score_geometry(box_cloud, box_cloud)
    assert score.fscore == 1.0 and score.chamfer < 1e-9 and score.fscore_unaligned == 1.0


def test_scale_estimation_and_icp_recover_a_rotated_scaled_shifted_copy(box_cloud):
    rotation = trimesh.transformations.rotation_matrix(math.radians(10), (0.3, 0.5, 0.8))[:3, :3]
    # another sampling of the same surface, so no point has an exact twin
    moved = 1.3 * cloud(trimesh.creation.box(extents=(0.9, 0.6, 0.5)), seed=7) @ rotation.T + [0.2, -0.1, 0.3]
    score = metrics.score_geometry(moved, box_cloud)
    assert score.fscore_unaligned < 0.5
    assert score.fscore > 0.95
    transform = score.alignment.transform
    assert transform.scale == pytest.approx(1 / 1.3, rel=0.02)
    assert transform.rotation_deg == pytest.approx(10.0, abs=1.0)


def test_umeyama_is_exact_on_paired_points(box_cloud):
    rotation = trimesh.transformations.rotation_matrix(0.7, (1.0, -2.0, 0.5))[:3, :3]
    truth = metrics.Similarity(2.5, rotation, np.array([1.0, 2.0, -3.0]))
    found = metrics.umeyama(box_cloud, truth.apply(box_cloud))
    np.testing.assert_allclose(found.matrix(), truth.matrix(), atol=1e-9)


def test_a_different_shape_scores_low(box_cloud):
    sphere = cloud(trimesh.creation.icosphere(subdivisions=4, radius=0.4), seed=1)
    score = metrics.score_geometry(sphere, box_cloud)
    assert score.fscore < 0.5 and score.chamfer > 0.03


def test_chamfer_is_symmetric_and_fscore_threshold_is_in_normalized_units(box_cloud):
    sphere = cloud(trimesh.creation.icosphere(subdivisions=4, radius=0.4), seed=1)
    assert metrics.chamfer(sphere, box_cloud) == pytest.approx(metrics.chamfer(box_cloud, sphere), rel=1e-12)
    assert metrics.chamfer(box_cloud + [0.01, 0, 0], box_cloud) > 0
    # the normalized frame: the ground truth's longest side becomes 1, centered on its box
    normalized = metrics.normalization(box_cloud * 3.0 + 5.0).apply(box_cloud * 3.0 + 5.0)
    np.testing.assert_allclose(np.ptp(normalized, axis=0).max(), 1.0)
    np.testing.assert_allclose(normalized.min(0) + normalized.max(0), 0.0, atol=1e-12)
    # in the clouds' own units: a copy moved by 0.04 of the longest side is within 0.05 of it
    assert metrics.fscore(box_cloud + [0.04 * 0.9, 0, 0], box_cloud, 0.05 * 0.9) > 0.99


# ----------------------------------------------------------------------------------------------- images


def test_psnr_and_ssim_of_identical_images():
    image = np.random.default_rng(0).random((32, 40, 3))
    assert metrics.psnr(image, image) == math.inf
    assert metrics.ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_psnr_and_ssim_of_a_constant_offset_match_the_closed_form():
    rng = np.random.default_rng(1)
    image = 0.2 + 0.5 * rng.random((48, 48, 3))
    offset = 0.1
    assert metrics.psnr(image, image + offset) == pytest.approx(-20 * math.log10(offset), rel=1e-9)
    # constant images: variances are zero, so SSIM is the luminance term alone
    flat, c1 = 0.3, (0.01 * 1.0) ** 2
    expected = (2 * flat * (flat + offset) + c1) / (flat ** 2 + (flat + offset) ** 2 + c1)
    assert metrics.ssim(np.full((24, 24), flat), np.full((24, 24), flat + offset)) == pytest.approx(expected, rel=1e-9)
    # an offset keeps structure and contrast: SSIM below 1 only through luminance
    assert 0.8 < metrics.ssim(image, image + offset) < 1.0


def test_ssim_matches_scikit_image_when_installed():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    a = rng.random((40, 36, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    expected = skimage_metrics.structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                                     sigma=1.5, use_sample_covariance=False)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------------ realfusion eval


class TrueColors:
    """A "field" for `bake_albedo` whose albedo is the true mesh's color at the nearest surface point."""

    def __init__(self, mesh: trimesh.Trimesh):
        from scipy.spatial import cKDTree

        self.mesh = mesh
        self.colors = np.asarray(mesh.visual.vertex_colors, np.float64)[:, :3] / 255.0
        samples, self.sample_face = trimesh.sample.sample_surface(mesh, 100000, seed=0)
        self.tree = cKDTree(samples)  # nearest face by dense samples (trimesh.proximity needs rtree)

    def __call__(self, x):
        import torch

        points = x.double().numpy()
        face = self.sample_face[self.tree.query(points)[1]]
        bary = np.clip(trimesh.triangles.points_to_barycentric(self.mesh.triangles[face], points), 0, None)
        bary /= bary.sum(1, keepdims=True)
        albedo = np.einsum("nk,nkc->nc", bary, self.colors[self.mesh.faces[face]])
        return torch.zeros(len(points)), torch.as_tensor(albedo, dtype=torch.float32)


def write_perfect_reconstruction(outdir: Path, textured: bool) -> None:
    """An OUTDIR as `realfusion demo` leaves it, whose exported mesh is the ground-truth mesh itself."""
    cfg = ReconstructionConfig()
    cfg.matting.image_size = 128
    mesh = make_object("box", cfg.camera, cfg.matting.object_fraction)
    outdir.mkdir(parents=True, exist_ok=True)
    photo = photograph(mesh, cfg, supersample=2)
    Image.fromarray(photo).save(outdir / "input.png")
    Image.fromarray(photo).save(outdir / "reference.png")
    write_ground_truth(mesh, outdir)

    # as `export_field` writes it: placed at the origin, 1 m, Y up in the file, the reference camera with it
    vertices, faces = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces)
    placement = Placement.for_vertices(vertices, 1.0, "center")
    normals = mesh.vertex_normals
    if textured:
        welded = trimesh.Trimesh(vertices, faces)  # one chart per side, not per triangle
        uv_mesh = unwrap(np.asarray(welded.vertices), np.asarray(welded.faces))
        texture = bake_albedo(TrueColors(mesh), np.asarray(welded.vertices), uv_mesh, 256)
        data = MeshData(placement.apply(welded.vertices[uv_mesh.source]), welded.vertex_normals[uv_mesh.source],
                        uv_mesh.faces, uv=uv_mesh.uv, texture=to_uint8(texture))
    else:
        data = MeshData(placement.apply(vertices), normals, faces, colors=TrueColors(mesh).colors)
    camera = reference_camera(cfg.camera, cfg.matting.image_size)
    c2w, fovy = camera.c2w[0].double().numpy(), float(camera.fovy[0])
    (outdir / "mesh.glb").write_bytes(glb_bytes(data, CameraData(placement.camera_to_world(c2w), fovy, 1.0),
                                                MESH_NODE, CAMERA_NODE))
    description = camera_description(c2w, fovy, camera.width, camera.height, placement, CAMERA_NODE)
    (outdir / "camera.json").write_text(json.dumps(description))


@pytest.fixture(scope="module")
def perfect(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("perfect")
    write_perfect_reconstruction(folder, textured=True)
    return folder


def test_eval_scores_the_ground_truth_itself_near_perfectly(perfect, capsys):
    started = time.perf_counter()
    assert main(["eval", str(perfect), "--views", "8", "--resolution", "96"]) == 0
    assert time.perf_counter() - started < 30
    assert "F-score" in capsys.readouterr().out
    result = json.loads((perfect / EVAL_FILE).read_text())
    assert result["inputs"]["mesh_textured"]
    assert result["geometry"]["fscore"] > 0.95 and result["geometry"]["fscore_unaligned"] > 0.95
    assert result["geometry"]["chamfer"] < 0.01
    assert result["reference_view"]["psnr"] > 25 and result["reference_view"]["mask_iou"] > 0.95
    assert result["reference_view"]["ssim"] > 0.9
    assert result["novel_views"]["psnr"] > 25 and result["novel_views"]["ssim"] > 0.9
    assert len(result["novel_views"]["per_view"]) == 8
    assert result["settings"]["fscore_threshold"] == 0.05 and result["versions"]["realfusion"]
    sheet = np.asarray(Image.open(perfect / SHEET_FILE))
    assert sheet.shape == (3 * 96, 8 * 96, 3)
    # row 2 (reconstruction) and row 3 (ground truth) show the same thing
    rows = sheet.reshape(3, 96, 8 * 96, 3).astype(float) / 255
    assert metrics.psnr(rows[1], rows[2]) > 25
    assert rows[0][:, 96:].min() == 1.0  # row 1: the input, then blank


def test_eval_reads_vertex_colored_meshes(tmp_path):
    write_perfect_reconstruction(tmp_path, textured=False)
    result = evaluate(tmp_path, views=2, resolution=64)
    assert not result["inputs"]["mesh_textured"]
    assert result["geometry"]["fscore"] > 0.95 and result["novel_views"]["psnr"] > 25


def test_eval_with_ground_truth_elsewhere_and_wrong_ones_score_low(perfect, tmp_path):
    other = make_object("mug")
    write_ground_truth(other, tmp_path)
    result = evaluate(perfect, ground_truth=tmp_path / "ground_truth", views=2, resolution=48)
    assert result["geometry"]["fscore"] < 0.7 and result["novel_views"]["psnr"] < 20
    assert result["inputs"]["ground_truth"] == str((tmp_path / "ground_truth").resolve())


@pytest.mark.parametrize("missing, hint", [("mesh.glb", "realfusion export"), ("camera.json", "realfusion export"),
                                           ("reference.png", "realfusion reconstruct"),
                                           ("ground_truth/mesh.ply", "--ground-truth")])
def test_missing_files_are_one_line_errors_with_the_fix(perfect, tmp_path, capsys, missing, hint):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(perfect, folder)
    (folder / missing).unlink()
    with pytest.raises(EngineError, match=hint):
        evaluate(folder, views=1, resolution=32)
    assert main(["eval", str(folder)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and hint in err


def test_eval_of_a_folder_that_does_not_exist(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) != 0
    assert "no folder" in capsys.readouterr().err
