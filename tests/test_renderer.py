"""The renderer against closed forms: silhouettes, depth, transmittance, normals and shading."""

import math

import pytest
import torch

from analytic_fields import SphereField, UniformField
from engine.cameras import orbit_cameras
from engine.config import RenderConfig
from engine.renderer import VolumeRenderer, intersect_box, light_directions_near


def render(field, cameras, **kwargs):
    renderer = VolumeRenderer(RenderConfig(step_size=0.006), bound=0.75)
    return renderer.render(field, None, cameras, **kwargs)


def test_sphere_silhouette_matches_its_projection():
    cam = orbit_cameras(90.0, 0.0, 2.0, 40.0, 48)
    out = render(SphereField(radius=0.4), cam)
    origins, dirs = cam.rays()
    # a ray hits the sphere iff its closest approach to the center is under the radius
    closest = torch.cross(dirs, -origins, dim=-1).norm(dim=-1)
    inside = closest < 0.4
    assert out.opacity[inside & (closest < 0.38)].min() > 0.99
    assert out.opacity[~inside].max() < 1e-6


def test_depth_is_distance_to_the_surface():
    cam = orbit_cameras(90.0, 0.0, 2.0, 40.0, 32)
    out = render(SphereField(radius=0.4), cam)
    center_depth = out.depth[0, 15:17, 15:17].mean().item()
    assert center_depth == pytest.approx(2.0 - 0.4, abs=0.02)


def test_uniform_medium_follows_beer_lambert():
    cam = orbit_cameras(90.0, 0.0, 2.0, 1.0, 2)  # nearly parallel rays straight through the box
    out = render(UniformField(density=1.5), cam)
    expected = 1.0 - math.exp(-1.5 * 1.5)  # box side is 2 * bound = 1.5
    assert out.opacity.mean().item() == pytest.approx(expected, rel=1e-3)
    # white background shows through the rest
    color = torch.tensor([0.2, 0.6, 0.4]) * expected + (1 - expected)
    assert torch.allclose(out.rgb[0, 0, 0], color, atol=1e-3)


def test_rays_that_miss_the_box_are_empty():
    origins = torch.tensor([[0.0, -2.0, 2.0]])
    dirs = torch.tensor([[0.0, 1.0, 0.0]])
    near, far = intersect_box(origins, dirs, 0.75)
    assert far <= near
    cam = orbit_cameras(90.0, 0.0, 2.0, 170.0, 16)  # so wide that the corners miss the box
    out = render(UniformField(density=5.0), cam)
    assert out.opacity[0, 0, 0] == 0.0


def test_normals_face_the_camera_at_the_center_and_albedo_shows_the_front():
    cam = orbit_cameras(90.0, 0.0, 2.0, 40.0, 32)
    out = render(SphereField(radius=0.4), cam)
    center_normal = out.normal[0, 16, 16]
    to_camera = cam.position[0] / cam.position[0].norm()
    assert torch.dot(center_normal / center_normal.norm(), to_camera) > 0.99
    assert out.orientation.item() == pytest.approx(0.0, abs=1e-6)  # no normal faces away where it is seen
    # seen from the front (-Y), +X (red) is on the right half of the image
    assert out.rgb[0, 16, 24, 0] > 0.9 and out.rgb[0, 16, 8, 2] > 0.9


def test_lambertian_shading_darkens_away_from_the_light_and_textureless_drops_the_albedo():
    cam = orbit_cameras(90.0, 0.0, 2.0, 40.0, 32)
    light = light_directions_near(cam, spread=0.0)
    sphere = SphereField(radius=0.4)
    lit = render(sphere, cam, shading="lambertian", light_dir=light, ambient=0.1)
    plain = render(sphere, cam, shading="textureless", light_dir=light, ambient=0.1)
    albedo = render(sphere, cam, shading="albedo")
    center, rim = (16, 18), (16, 24)  # both on the red half; the sphere spans about 9 px of radius
    assert lit.rgb[0, center[0], center[1], 0] > lit.rgb[0, rim[0], rim[1], 0] + 0.2
    assert lit.rgb[0, 16, 24, 0] <= albedo.rgb[0, 16, 24, 0] + 1e-6
    gray = plain.rgb[0, 16, 16]
    assert torch.allclose(gray, gray.mean().expand(3), atol=1e-5) and gray.mean() > 0.9


def test_unknown_shading_is_rejected():
    cam = orbit_cameras(90.0, 0.0, 2.0, 40.0, 4)
    with pytest.raises(ValueError, match="shading"):
        render(SphereField(), cam, shading="phong", light_dir=light_directions_near(cam, spread=0.0))


def test_compositing_is_the_product_of_transmittances_and_its_gradient_never_reads_the_device():
    """exp(-sum) equals the running product of (1 - alpha), also past an infinite density, and a training
    render asks the device for sizes only where it compacts samples: twice per march, once for normals."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from engine.renderer import composite

    sigma = torch.rand(4, 50) * 30.0
    sigma[1, 10] = float("inf")
    deltas = torch.full_like(sigma, 0.01)
    alpha = 1.0 - torch.exp(-sigma * deltas)
    product = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], -1), -1)
    assert torch.allclose(composite(sigma, deltas), alpha * product, atol=1e-6)

    class Reads(TorchDispatchMode):  # ops whose CUDA kernels wait for the GPU to hand the host a size or a flag
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in ("nonzero", "_local_scalar_dense", "masked_select", "cumprod_backward") or (
                    name.startswith("index") and any(getattr(i, "dtype", None) == torch.bool for i in args[1] or [])):
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    field = SphereField(radius=0.4)
    field.density_value = torch.nn.Parameter(torch.tensor(200.0))  # a gradient through every composite
    cam = orbit_cameras(90.0, 0.0, 2.0, 40.0, 16)
    renderer = VolumeRenderer(RenderConfig(step_size=0.006), bound=0.75)
    # the sample count comes from the cameras' CPU copy (on a GPU, a read of host memory): outside the count
    near, far = intersect_box(*(r.reshape(-1, 3) for r in cam.rays()), 0.75)
    count = renderer.sample_count(cam)
    assert count == math.ceil(float((far - near).max()) / 0.006) + 1  # the longest chord these rays take
    renderer.sample_count = lambda cameras: count
    with Reads() as reads:
        out = renderer.render(field, None, cam, stratified=True, shading="lambertian",
                              light_dir=torch.tensor([[0.0, -1.0, 0.0]]))
        (out.rgb.sum() + out.normal.sum()).backward()
    assert field.density_value.grad is not None
    assert reads.names == ["nonzero", "nonzero", "nonzero"]
