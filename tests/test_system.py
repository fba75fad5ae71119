"""The training loop: the reference view is reproduced, the schedule follows the config, the prior's
gradient reaches the field, and a checkpoint restores the run."""

from dataclasses import dataclass

import pytest
import torch

from analytic_fields import SphereField
from engine.cameras import reference_camera
from engine.config import apply_overrides, preset
from engine.renderer import VolumeRenderer
from engine.system import RealFusionSystem, ReferenceView

SMALL = ["render.ref_resolution=32", "render.random_resolution=24", "render.step_size=0.1", "render.occupancy_resolution=32",
         "field.n_levels=8", "field.log2_hashmap_size=14", "field.finest_resolution=128",
         "fit.coarse_levels_masked=4"]


def small_config(*overrides):
    return apply_overrides(preset("fast"), SMALL + list(overrides))


def sphere_reference(cfg):
    """The photo: a red/blue sphere seen from the configured reference camera, on white."""
    camera = reference_camera(cfg.camera, cfg.render.ref_resolution)
    truth = VolumeRenderer(cfg.render, cfg.field.bound).render(SphereField(0.35), None, camera, with_normals=False)
    return ReferenceView(truth.rgb[0], truth.opacity[0]), camera


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


@dataclass
class Guided:
    loss: torch.Tensor


class RecordingPrior:
    """Stands in for SDS: a loss that pulls every rendered pixel toward black, and a record of its inputs."""

    def __init__(self):
        self.calls = []

    def sds_loss(self, images, cameras=None, lighting=None, background=None, views=None):
        self.calls.append((images.detach().clone(), cameras))
        return Guided(images.mean())


class NoPrior:
    def sds_loss(self, images, cameras=None, lighting=None, background=None, views=None):
        raise AssertionError("loss.sds=0 must not call the prior")


def test_reference_only_fit_reproduces_the_reference_view():
    torch.manual_seed(0)
    cfg = small_config("loss.sds=0", "fit.iterations=150")
    reference, camera = sphere_reference(cfg)
    system = RealFusionSystem(cfg, reference, NoPrior(), torch.device("cpu"))
    before = psnr(system.render(camera).rgb[0], reference.rgb)
    for _ in range(cfg.fit.iterations):
        system.training_step()
    after = system.render(camera, use_ema=False)
    assert psnr(after.rgb[0], reference.rgb) > 28.0 > before + 10
    silhouette = after.opacity[0] > 0.5
    truth = reference.mask > 0.5
    assert (silhouette & truth).sum() / (silhouette | truth).sum() > 0.95


def test_schedule_masks_the_fine_levels_then_releases_them():
    cfg = small_config("fit.iterations=10", "fit.coarse_to_fine_fraction=0.6")
    system = RealFusionSystem(cfg, sphere_reference(cfg)[0], RecordingPrior(), torch.device("cpu"))
    assert [system.active_levels(s) for s in (0, 5, 6, 9)] == [4, 4, 8, 8]


def test_paper_schedule_masks_the_top_8_of_16_levels_for_3000_of_5000_iterations():
    cfg = apply_overrides(preset("paper"), ["field.log2_hashmap_size=8", "render.ref_resolution=8"])
    system = RealFusionSystem(cfg, sphere_reference(cfg)[0], RecordingPrior(), torch.device("cpu"))
    assert [system.active_levels(s) for s in (0, 2999, 3000, 4999)] == [8, 8, 16, 16]
    assert system.choose_shading(999) == "albedo"


def test_albedo_only_warm_up_then_random_shading():
    cfg = small_config("fit.iterations=100", "render.albedo_only_fraction=0.2")
    system = RealFusionSystem(cfg, sphere_reference(cfg)[0], RecordingPrior(), torch.device("cpu"))
    assert {system.choose_shading(s) for s in range(20)} == {"albedo"}
    later = [system.choose_shading(s) for s in range(20, 100) for _ in range(3)]
    assert set(later) == {"albedo", "lambertian", "textureless"}


def test_prior_sees_a_random_view_and_its_gradient_reaches_the_field():
    cfg = small_config("loss.image=0", "loss.mask=0", "fit.iterations=4")
    prior = RecordingPrior()
    system = RealFusionSystem(cfg, sphere_reference(cfg)[0], prior, torch.device("cpu"))
    grid_before = [p.detach().clone() for p in system.field.grid_parameters()]
    report = system.training_step()
    images, cameras = prior.calls[0]
    assert images.shape == (1, 3, 24, 24) and cameras.width == 24
    assert cfg.camera.radius_range[0] <= float(cameras.position.norm()) <= cfg.camera.radius_range[1]
    assert {"sds", "entropy", "normal_smooth_2d", "orientation"} <= set(report)
    moved = any(not torch.equal(a, b) for a, b in zip(grid_before, system.field.grid_parameters()))
    assert moved


def test_checkpoint_restores_step_weights_and_optimizer(tmp_path):
    cfg = small_config("fit.iterations=6")
    reference = sphere_reference(cfg)[0]
    system = RealFusionSystem(cfg, reference, RecordingPrior(), torch.device("cpu"))
    for _ in range(3):
        system.training_step()
    torch.save(system.state_dict(), tmp_path / "ckpt.pt")

    restored = RealFusionSystem(cfg, reference, RecordingPrior(), torch.device("cpu"), seed=123)
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert restored.step == 3
    for a, b in zip(system.field.parameters(), restored.field.parameters()):
        assert torch.equal(a, b)
    assert restored.optimizer.state_dict()["state"][0]["step"] == 3
    # Same generator state: the next random view is the one the first run would have drawn.
    assert torch.equal(restored.generator.get_state(), system.generator.get_state())


@pytest.mark.parametrize("shading", ["albedo", "lambertian", "textureless"])
def test_render_on_white_has_white_where_empty(shading):
    cfg = small_config()
    reference, camera = sphere_reference(cfg)
    system = RealFusionSystem(cfg, reference, RecordingPrior(), torch.device("cpu"))
    with torch.no_grad():
        system.field.net[-1].bias[0] = -30.0  # nothing anywhere
    system.ema.shadow[0].load_state_dict(system.field.state_dict())
    out = system.render(camera, shading=shading)
    assert torch.allclose(out.rgb, torch.ones_like(out.rgb), atol=1e-4)


class OverflowingPrior:
    def sds_loss(self, images, cameras=None, lighting=None, background=None, views=None):
        return Guided(images.mean() * float("nan"))


def test_a_non_finite_step_is_skipped_instead_of_poisoning_the_weights():
    cfg = small_config("fit.iterations=4")
    system = RealFusionSystem(cfg, sphere_reference(cfg)[0], OverflowingPrior(), torch.device("cpu"))
    before = [p.detach().clone() for p in system.field.parameters()]
    report = system.training_step()
    assert report["skipped"] == 1 and system.step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, system.field.parameters()))
    assert all(torch.isfinite(p).all() for p in system.ema.shadow[0].parameters())
