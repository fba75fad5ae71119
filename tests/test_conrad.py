"""ConRad (`--method conrad`): the constrained field against closed forms, the shared loop, and the method's
plumbing through the CLI, the job server's schema and the add-on's menu."""

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analytic_fields import BallField
from engine.cameras import reference_camera
from engine.cli import main
from engine.config import CameraConfig
from engine.fields.constrained import ConstrainedField, estimate_depth
from engine.methods import METHODS
from engine.system import RealFusionSystem
from test_cli import reconstruct_args
from test_system import NoPrior, psnr, small_config, sphere_reference

REPO = Path(__file__).resolve().parents[1]
SIZE, SAMPLES = 32, 64


def ball_and_camera(radius=0.4):
    field = BallField(radius=radius)
    camera = reference_camera(CameraConfig(), SIZE)
    return field, camera


def true_ball_hits(camera, radius):
    """Distance along each reference ray [H*W] to the ball's front surface (nan for a miss)."""
    origins, dirs = (r[0].reshape(-1, 3) for r in camera.rays())
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius**2
    disc = b * b - c
    return torch.where(disc > 0, -b - disc.clamp(min=0).sqrt(), torch.full_like(b, float("nan"))), origins, dirs


def constrained_ball(radius=0.4, delta=0.05):
    field, camera = ball_and_camera(radius)
    photo = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    constrained = ConstrainedField(field, camera.c2w[0], float(camera.fovy[0]), photo, torch.ones(SIZE, SIZE),
                                   delta, bound=field.bound)
    constrained.refresh_depth(SIZE, SAMPLES)
    return constrained, field, camera, photo


@pytest.mark.parametrize("threshold", [0.05, 0.5])  # ConRad's own (`paper`), and the median of `standard`/`fast`
def test_estimated_depth_is_the_analytic_surface_within_one_sample_spacing(threshold):
    radius = 0.4
    field, camera = ball_and_camera(radius)
    depth = estimate_depth(field, camera, field.bound, SAMPLES, threshold).reshape(-1)
    t_true, origins, dirs = true_ball_hits(camera, radius)
    from engine.renderer import intersect_box

    near, far = intersect_box(origins, dirs, field.bound)
    forward = -camera.c2w[0, :3, 2]
    t_estimated = depth / (dirs @ forward)
    # rays that meet the ball clearly (not grazing its rim): the surface is at the analytic intersection
    miss_distance = (origins - (origins * dirs).sum(-1, keepdim=True) * dirs).norm(dim=-1)
    clear = miss_distance < 0.85 * radius
    assert clear.sum() > 100
    spacing = (far - near) / SAMPLES
    # The field reaches optical depth ln 2 at its surface (analytic_fields.ShapeField) and then grows at its peak
    # density: transmittance falls to `threshold` (optical depth -ln threshold) a closed-form distance behind
    # the surface; the median (0.5) is the surface itself.
    t_threshold = t_true + (-math.log(threshold) - math.log(2.0)) / field.peak
    error = (t_estimated - t_threshold).abs()
    assert bool((error[clear] <= spacing[clear]).all()), float((error[clear] / spacing[clear]).max())
    assert bool((depth[miss_distance > radius + 0.1] >= 1e3).all())  # a ray that misses (its tail too) meets nothing


def test_a_point_in_front_of_the_surface_takes_the_photos_pixel_and_one_behind_the_fields_albedo():
    constrained, field, camera, photo = constrained_ball(delta=0.05)
    t_true, origins, dirs = true_ball_hits(camera, 0.4)
    pixels = torch.nonzero(torch.isfinite(t_true))[:, 0][::7]  # pixel centers the ball covers
    in_front = origins[pixels] + dirs[pixels] * (t_true[pixels] - 0.2)[:, None]
    behind = origins[pixels] + dirs[pixels] * (t_true[pixels] + 0.1)[:, None]  # inside the ball, past delta
    sigma, color = constrained(in_front)
    expected = photo.reshape(-1, 3)[pixels]
    assert torch.allclose(color, expected, atol=1e-5), float((color - expected).abs().max())
    assert torch.equal(sigma, field.density(in_front))  # density is always the field's
    sigma, color = constrained(behind)
    assert torch.equal(color, field(behind)[1]) and torch.equal(sigma, field.density(behind))
    outside = torch.tensor([[0.0, 5.0, 0.0]])  # behind the camera: the photo does not see it
    assert torch.equal(constrained(outside)[1], field(outside)[1])


def test_the_reference_view_of_a_constrained_field_is_the_photo_from_the_first_iteration():
    torch.manual_seed(0)
    # ConRad's own surface threshold: 95 % of each ray's opacity lies in front of the estimated surface
    cfg = small_config("loss.sds=0", "fit.iterations=3", "conrad.depth_threshold=0.05")
    reference, camera = sphere_reference(cfg)
    baseline = psnr(RealFusionSystem(cfg, reference, NoPrior(), torch.device("cpu")).render(camera).rgb[0],
                    reference.rgb)
    cfg.method = "conrad"
    system = RealFusionSystem(cfg, reference, NoPrior(), torch.device("cpu"))
    # Untrained, the field is a soft blob that fills the frame: up to 5% of each ray's light (the normalised
    # transmittance left at the estimated surface) lands behind it, on the field's own albedo.
    assert psnr(system.render(camera).rgb[0], reference.rgb) > 30.0 > baseline + 10
    report = system.training_step()
    assert "mask" in report and system.loss_weights(0)["image"] == 0.0  # no color image loss
    assert psnr(system.render(camera).rgb[0], reference.rgb) > 30.0


def test_unknown_method_is_a_one_line_error_listing_the_methods(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["reconstruct", str(tmp_path / "none.png"), "-o", str(out), "--method", "zero123", "--device", "cpu"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "zero123" in lines[0] and "realfusion, conrad" in lines[0]
    assert not out.exists()


def test_cli_reconstructs_with_conrad_and_the_export_bakes_the_constrained_field(tmp_path, tiny_sd_dir):
    from PIL import Image

    from engine.field_file import load_field
    from synthetic_images import rgba_disc

    out = tmp_path / "out"
    photo = rgba_disc(tmp_path / "disc.png")
    assert main(reconstruct_args(photo, out, tiny_sd_dir, tmp_path / "cache", "--method", "conrad")) == 0
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    assert json.loads((out / "config.json").read_text())["method"] == "conrad"
    field, _cfg = load_field(out / "field.pt", torch.device("cpu"))
    assert isinstance(field, ConstrainedField) and field.depth.shape[-1] == Image.open(out / "reference.png").width
    assert (out / "mesh.glb").is_file()


def test_every_method_is_offered_by_the_server_schema_and_the_addon_menu():
    from engine.server.schemas import JobRequest

    assert list(METHODS) == ["realfusion", "conrad"]
    assert JobRequest(image_png_base64="", method="conrad").method == "conrad"
    with pytest.raises(ValueError):
        JobRequest(image_png_base64="", method="zero123")
    tree = ast.parse((REPO / "realfusion_blender" / "properties.py").read_text())
    items = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", None) == "METHOD_ITEMS")
    assert [ast.literal_eval(item)[0] for item in items.elts] == list(METHODS)


@pytest.mark.parametrize("outside_mask", ["background", "field"])
def test_where_the_photo_shows_no_object_a_point_takes_the_background_or_the_fields_albedo(outside_mask):
    field, camera = ball_and_camera()
    photo = torch.ones(SIZE, SIZE, 3)  # over white
    mask = torch.zeros(SIZE, SIZE)
    constrained = ConstrainedField(field, camera.c2w[0], float(camera.fovy[0]), photo, mask, 0.05,
                                   bound=field.bound, outside_mask=outside_mask)
    constrained.refresh_depth(SIZE, SAMPLES)
    t_true, origins, dirs = true_ball_hits(camera, 0.4)
    pixels = torch.nonzero(torch.isfinite(t_true))[:, 0][::11]
    points = origins[pixels] + dirs[pixels] * t_true[pixels, None]  # on the ball's front, where the mask is empty
    color = constrained(points)[1]
    expected = torch.ones_like(color) if outside_mask == "background" else field(points)[1]
    assert torch.allclose(color, expected, atol=1e-6)


def test_a_hidden_point_next_to_the_outline_keeps_the_fields_albedo():
    """Between a pixel that sees the ball and one that sees nothing, a point behind the ball's surface is hidden:
    blending the two depths (the ball's and EMPTY_DEPTH) would put the surface far behind it and hand it the
    photo's outline and background colors (white bands on the sides of the object in other views)."""
    constrained, field, camera, photo = constrained_ball(delta=0.05)
    depth = constrained.depth[0, 0]
    covered = depth < 1e3  # the pixel's ray meets the ball
    rows, cols = torch.nonzero(covered[:, :-1] & ~covered[:, 1:], as_tuple=True)  # covered, its right one not
    assert len(rows) > 5
    forward = -camera.c2w[0, :3, 2]
    focal = float(camera.focal_px()[0])
    x = (cols.float() + 1.0 - 0.5 * SIZE) / focal  # halfway between the two pixel centers (camera coordinates)
    y = -(rows.float() + 0.5 - 0.5 * SIZE) / focal
    c2w = camera.c2w[0]
    ray = torch.nn.functional.normalize(torch.stack([x, y, -torch.ones_like(x)], -1) @ c2w[:3, :3].T, dim=-1)
    z = depth[rows, cols] + 0.2  # 0.2 behind the surface the covered pixel sees, along the camera's axis
    points = c2w[:3, 3] + ray * (z / (ray @ forward))[:, None]
    color = constrained(points)[1]
    assert torch.equal(color, field(points)[1])


def test_the_mesh_of_a_constrained_field_shows_the_photo_where_the_reference_camera_sees_it(tmp_path):
    """The export bakes from the mesh's own depth in the reference view: even where the field's estimated
    surface lies in front of the mesh (a soft part the iso-surface leaves out, like the bird's beak), every
    texel the camera sees takes the photo's pixel, so the mesh reproduces the photo in the reference view."""
    from engine.config import ExportConfig
    from engine.export import export_field
    from engine.harness.evaluate import load_exported_mesh
    from engine.harness.mesh_render import render_mesh
    from engine.harness.metrics import psnr as image_psnr

    size = 64
    field = BallField(radius=0.4)
    camera = reference_camera(CameraConfig(), size)
    t_true, origins, dirs = true_ball_hits(camera, 0.4)
    mask = torch.isfinite(t_true).reshape(size, size).float()
    u = torch.linspace(0.0, 1.0, size)
    pattern = torch.stack([u[None, :].expand(size, size), u[:, None].expand(size, size),
                           0.5 + 0.4 * torch.sin(12 * u)[None, :].expand(size, size)], -1)  # unlike the ball's albedo
    photo = pattern * mask[..., None] + (1.0 - mask[..., None])
    forward = -camera.c2w[0, :3, 2]
    depth = torch.where(torch.isfinite(t_true), t_true * (dirs @ forward) - 0.15, torch.full_like(t_true, 1e4))
    constrained = ConstrainedField(field, camera.c2w[0], float(camera.fovy[0]), photo, mask, 0.03,
                                   depth=depth.reshape(size, size), bound=field.bound)
    export_field(constrained, field.bound, camera, tmp_path, ExportConfig(resolution=64, texture_size=256,
                                                                          max_faces=4000))
    mesh = load_exported_mesh(tmp_path)
    fine = camera.with_resolution(4 * size, 4 * size)
    rgb, covered = render_mesh(mesh.vertices, mesh.faces, fine, mesh.uv, mesh.texture)
    rgb = torch.nn.functional.avg_pool2d(torch.as_tensor(rgb).permute(0, 3, 1, 2), 4)[0].permute(1, 2, 0).numpy()
    inside = torch.nn.functional.max_pool2d(1.0 - mask[None, None], 5, 1, 2)[0, 0].numpy() == 0  # 2 px from the rim
    assert image_psnr(rgb[inside], photo.numpy()[inside]) > 30.0


def test_the_mesh_depth_map_is_the_nearest_surface_along_the_cameras_axis():
    import trimesh

    from engine.export.bake import mesh_depth
    from engine.fields.constrained import EMPTY_DEPTH

    camera = reference_camera(CameraConfig(), SIZE)
    ball = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    behind = camera.c2w[0, :3, 3].numpy() - 0.5 * (-camera.c2w[0, :3, 2].numpy())  # a face behind the camera
    vertices = np.concatenate([ball.vertices, behind + np.array([[0.0, 0, 0], [2.0, 0, 0], [0, 0, 2.0]])])
    faces = np.concatenate([ball.faces, [[len(ball.vertices), len(ball.vertices) + 1, len(ball.vertices) + 2]]])
    depth = torch.as_tensor(mesh_depth(vertices, faces, camera)).reshape(-1)
    t_true, origins, dirs = true_ball_hits(camera, 0.4)
    forward = -camera.c2w[0, :3, 2]
    hit = torch.isfinite(t_true)
    miss_distance = (origins - (origins * dirs).sum(-1, keepdim=True) * dirs).norm(dim=-1)
    clear = miss_distance < 0.9 * 0.4
    expected = t_true * (dirs @ forward)
    assert bool(((depth - expected).abs()[clear] < 2e-3).all())  # the chords of a fine icosphere
    assert bool((depth[~hit & (miss_distance > 0.41)] == EMPTY_DEPTH).all())


def test_the_surface_threshold_per_preset_and_the_optional_color_image_loss():
    from engine.config import build_config

    assert build_config("paper", method="conrad").conrad.depth_threshold == 0.05  # ConRad's own
    assert {build_config(p, method="conrad").conrad.depth_threshold for p in ("standard", "fast", "demo")} == {0.5}
    cfg = small_config("conrad.image_loss=2.5")
    reference, _camera = sphere_reference(cfg)
    cfg.method = "conrad"
    system = RealFusionSystem(cfg, reference, NoPrior(), torch.device("cpu"))
    assert system.loss_weights(0)["image"] == 2.5
    from engine.validation import InvalidSettings, checked_config

    with pytest.raises(InvalidSettings, match="conrad.image_loss"):
        checked_config("fast", ["conrad.image_loss=-1"], method="conrad")
