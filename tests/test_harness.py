"""The quality harness's own parts: ground-truth ray caster, oracle prior, objects, and the offline demo."""

import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from analytic_fields import SphereField
from engine.cameras import reference_camera, sample_random_cameras
from engine.cli import main
from engine.config import CameraConfig, PriorConfig, ReconstructionConfig, RenderConfig
from engine.harness.demo import photograph
from engine.harness.objects import OBJECTS, make_object, outer_surface_points, surface_points
from engine.harness.oracle import OracleGuidance
from engine.harness.raycast import ColoredMesh, embree_available, intersect, render_ground_truth
from engine.matting import prepare_reference
from engine.renderer import Lighting, VolumeRenderer, shade


def two_tone_ball(radius=0.4) -> ColoredMesh:
    """The mesh twin of tests' SphereField: red where x > 0, blue elsewhere."""
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    red = mesh.vertices[:, 0] > 0
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.where(red[:, None], (255, 0, 0, 255),
                                                                           (0, 0, 255, 255)).astype(np.uint8))
    return ColoredMesh.from_trimesh(mesh)


def random_views(n=4, size=32, seed=1):
    return sample_random_cameras(CameraConfig(), n, size, torch.Generator().manual_seed(seed), "cpu")


def test_ray_caster_and_volume_renderer_agree_on_a_ball_from_random_views():
    cameras = random_views()
    truth = render_ground_truth(two_tone_ball(), cameras, supersample=1)
    volume = VolumeRenderer(RenderConfig(step_size=0.006), 0.75).render(SphereField(0.4), None, cameras,
                                                                          with_normals=False)
    assert ((truth.mask > 0.5) != (volume.opacity > 0.5)).float().mean() < 0.005
    assert ((truth.rgb - volume.rgb).abs().amax(-1) > 0.2).float().mean() < 0.02  # only the tessellated rim


@pytest.mark.skipif(not embree_available(), reason="embreex not installed")
def test_embree_and_pytorch_ray_casts_agree():
    mesh = ColoredMesh.from_trimesh(make_object("mug"))
    origins, dirs = random_views(2, 24).rays()
    fast = intersect(origins.reshape(-1, 3), dirs.reshape(-1, 3), mesh, backend="embree")
    slow = intersect(origins.reshape(-1, 3), dirs.reshape(-1, 3), mesh, backend="torch")
    assert torch.equal(torch.isfinite(fast[0]), torch.isfinite(slow[0]))
    hit = torch.isfinite(fast[0])
    assert torch.allclose(fast[0][hit], slow[0][hit], atol=1e-4)
    assert torch.allclose(fast[1], slow[1], atol=1e-4) and torch.allclose(fast[2], slow[2], atol=1e-4)


def test_shaded_truth_uses_the_renderers_shading():
    camera = reference_camera(CameraConfig(), 16)
    light = torch.tensor([[0.0, -1.0, 0.0]])
    albedo = render_ground_truth(two_tone_ball(), camera, supersample=1)
    lit = render_ground_truth(two_tone_ball(), camera, 1, Lighting("textureless", light, 0.1))
    inside = albedo.mask[0] > 0.99
    expected = shade(albedo.rgb[0][inside][:, None], albedo.normal[0][inside][:, None],
                     light.expand(int(inside.sum()), 3), "textureless", 0.1)[:, 0]
    assert torch.allclose(lit.rgb[0][inside], expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_objects_are_framed_like_a_matted_photo(name, tmp_path):
    """The demo's photo passes through matting unchanged, so the truth the oracle pulls toward is where the
    photo says the object is: its silhouette is the matted reference's to the pixel at the matting size
    (the bird had been left 5.5 px off, which capped its reference-view IoU at 0.963)."""
    cfg = ReconstructionConfig()
    mesh = make_object(name, cfg.camera, cfg.matting.object_fraction)
    size = cfg.matting.image_size
    truth = render_ground_truth(ColoredMesh.from_trimesh(mesh), reference_camera(cfg.camera, size), 1).mask[0].numpy()
    rows, cols = np.flatnonzero(truth.max(1) > 0.5), np.flatnonzero(truth.max(0) > 0.5)
    assert max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) == pytest.approx(0.8 * size, abs=1)
    assert (rows[0] + rows[-1] + 1) / 2 == pytest.approx(size / 2, abs=0.5)
    assert (cols[0] + cols[-1] + 1) / 2 == pytest.approx(size / 2, abs=0.5)

    Image.fromarray(photograph(mesh, cfg)).save(tmp_path / "photo.png")
    matted = prepare_reference(tmp_path / "photo.png", cfg.matting).mask
    soft_truth = render_ground_truth(ColoredMesh.from_trimesh(mesh), reference_camera(cfg.camera, size),
                                     3).mask[0].numpy()
    assert np.minimum(matted, soft_truth).sum() / np.maximum(matted, soft_truth).sum() > 0.99
    assert len(surface_points(mesh, 500)) == 500


def test_framing_converges_where_perspective_makes_the_near_tip_race_ahead():
    """A fixed-point framing step overshot the bird (its beak's tip close to the camera) and oscillated;
    Newton's steps settle, and an object that cannot be framed is an error, not a silently wrong truth."""
    from engine.harness.objects import FramingError, frame_for_reference

    camera = CameraConfig()
    long_bird = OBJECTS["bird"]()
    long_bird.apply_scale((1.0, 1.3, 1.0))  # deeper still: its tip nearer the camera
    framed = frame_for_reference(long_bird, camera, resolution=256)
    mask = render_ground_truth(ColoredMesh.from_trimesh(framed), reference_camera(camera, 256), 1).mask[0].numpy()
    rows = np.flatnonzero(mask.max(1) > 0.5)
    assert (rows[0] + rows[-1] + 1) / 2 == pytest.approx(128, abs=0.5)
    with pytest.raises(FramingError, match="larger than the reference view"):
        frame_for_reference(trimesh.creation.icosphere(radius=5.0), camera, resolution=64)


def test_the_true_points_lie_on_the_outer_surface_only():
    """The figure is a union of overlapping closed parts: the top of its body inside the head, the pack's inner
    side inside the body. Points there are on no surface a reconstruction could have, so the truth leaves
    them out, and still covers every part's outside."""
    from scipy.spatial import cKDTree

    mesh = make_object("figure")
    parts = mesh.split(only_watertight=False)
    clouds = [cKDTree(surface_points(part, 100000, seed=1)) for part in parts]

    def inside_another(points):
        on = [cloud.query(points)[0] < 0.01 for cloud in clouds]
        inside = np.zeros(len(points), bool)
        for i, part in enumerate(parts):
            others = np.any([p.contains(points) for j, p in enumerate(parts) if j != i], axis=0)
            inside |= on[i] & others
        return inside, on

    points = outer_surface_points(mesh, 4000)
    assert len(points) == 4000
    inside, on = inside_another(points)
    plain = inside_another(surface_points(mesh, 4000))[0].mean()
    assert plain > 0.05  # what plain sampling counted that no camera sees
    assert inside.mean() < 0.1 * plain  # (points within the sampling's tolerance of a seam may still count)
    assert all(o.sum() > 20 for o in on)  # every part keeps its outside


class TestOracle:
    """SDS of eq. (3) with the ideal denoiser: w(t) (eps_hat - eps) = w(t) sqrt(a / (1 - a)) (x - x*)."""

    def setup_method(self):
        self.oracle = OracleGuidance(two_tone_ball(), PriorConfig(), torch.Generator().manual_seed(0))
        self.cameras = random_views(1, 16)
        self.truth = self.oracle.truth(self.cameras, (16, 16))

    def gradient(self, images, t):
        images = images.clone().requires_grad_(True)
        self.oracle.sds_loss(images, self.cameras, t=torch.tensor([t])).loss.backward()
        return images.grad

    def test_gradient_is_the_closed_form(self):
        images = torch.rand(1, 3, 16, 16)
        a = self.oracle.alphas_cumprod[500]
        expected = (1 - a) * (a / (1 - a)).sqrt() * ((images * 2 - 1) - (self.truth * 2 - 1)) * 2  # d x / d image = 2
        assert torch.allclose(self.gradient(images, 500), expected, atol=1e-4)

    def test_a_gradient_step_moves_toward_the_truth(self):
        images = torch.rand(1, 3, 16, 16)
        step = images - 0.1 * self.gradient(images, 300)
        assert (step - self.truth).abs().mean() < (images - self.truth).abs().mean()

    def test_gradient_vanishes_at_the_truth_and_as_t_goes_to_zero(self):
        assert self.gradient(self.truth, 700).abs().max() < 1e-4
        images = torch.rand(1, 3, 16, 16)
        a0, a500 = self.oracle.alphas_cumprod[0], self.oracle.alphas_cumprod[500]
        ratio = self.gradient(images, 0).abs().max() / self.gradient(images, 500).abs().max()
        assert ratio == pytest.approx(float((a0 * (1 - a0)).sqrt() / (a500 * (1 - a500)).sqrt()), rel=1e-3)
        assert ratio < 0.1  # sqrt(a (1 - a)) -> 0 as t -> 0: nothing left to denoise

    def test_truth_is_drawn_over_the_renders_own_background(self):
        backdrop = torch.zeros(1, 3, 16, 16)
        backdrop[:, 1] = 1.0  # green
        over_green = self.oracle.truth(self.cameras, (16, 16), background=backdrop)
        empty = self.oracle.truth(self.cameras, (16, 16)).sum(1) == 3.0  # white: no object there
        assert torch.equal(over_green[0, :, empty[0]], backdrop[0, :, empty[0]])

    def test_timesteps_are_drawn_from_the_configured_range(self):
        t = torch.cat([self.oracle.sds_loss(torch.rand(1, 3, 16, 16), self.cameras).timesteps for _ in range(200)])
        assert t.min() >= 20 and t.max() <= 980 and t.float().std() > 200


TINY_DEMO = ["matting.image_size=64", "fit.iterations=4", "fit.preview_every=2", "fit.checkpoint_every=2",
             "fit.turntable_resolution=24", "render.ref_resolution=24", "render.random_resolution=16",
             "render.step_size=0.1", "render.occupancy_resolution=32", "field.n_levels=4", "field.log2_hashmap_size=10", "field.finest_resolution=32",
             "export.resolution=32", "export.texture_size=64", "export.max_faces=2000", "field.blob_density=20"]


def test_demo_runs_offline_and_ends_in_a_glb(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--object", "box", "--device", "cpu"]
    for override in TINY_DEMO:
        args += ["--set", override]
    assert main(args) == 0
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done"
    for name in ("input.png", "ground_truth/mesh.ply", "ground_truth/points.npy", "mesh.glb", "camera.json",
                 "turntable.png", "eval.json", "eval.png"):
        assert (out / name).is_file(), name


def test_demo_rejects_an_unknown_object(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "d"), "--object", "teapot"]) == 2
    assert "box, mug" in capsys.readouterr().err
