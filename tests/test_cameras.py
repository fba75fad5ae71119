"""Cameras: Blender's conventions (Z up, camera looks down -Z), the reference view where the config puts it."""

import math

import pytest
import torch

from engine.cameras import orbit_cameras, reference_camera, sample_random_cameras, turntable_cameras
from engine.config import CameraConfig


def test_reference_camera_sits_at_configured_distance_elevation_and_azimuth():
    cfg = CameraConfig()
    cam = reference_camera(cfg, 128)
    x, y, z = cam.position[0].tolist()
    assert math.isclose(math.sqrt(x * x + y * y + z * z), cfg.ref_radius, rel_tol=1e-6)
    elevation = math.degrees(math.asin(z / cfg.ref_radius))
    assert elevation == pytest.approx(90.0 - cfg.ref_polar_deg, abs=1e-4)  # 15 deg above the horizon
    assert x == pytest.approx(0.0, abs=1e-6) and y < 0  # azimuth 0: Blender's front view, from -Y


def test_reference_camera_looks_at_origin_with_world_up_up_in_the_image():
    cam = reference_camera(CameraConfig(), 128)
    pixels = cam.project(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.3], [0.3, 0.0, 0.0]]))[0]
    center, above, right = pixels
    assert center.tolist() == pytest.approx([64.0, 64.0], abs=1e-3)
    assert above[1] < center[1]  # +Z is up on screen (y grows downward)
    assert right[0] > center[0]  # +X is to the right seen from the front


def test_vertical_field_of_view_spans_the_image_height():
    cfg = CameraConfig()
    cam = reference_camera(cfg, 100)
    back = cam.c2w[0, :3, 2]
    up = cam.c2w[0, :3, 1]
    half = math.radians(cfg.ref_fovy_deg) / 2
    # a point on the top edge of the frustum, one unit in front of the camera
    edge = cam.position[0] - back + up * math.tan(half)
    assert cam.project(edge[None])[0, 0, 1].item() == pytest.approx(0.0, abs=1e-3)


def test_rays_start_at_the_camera_and_the_center_ray_hits_the_origin():
    cam = reference_camera(CameraConfig(), 64)
    origins, dirs = cam.rays()
    assert origins.shape == dirs.shape == (1, 64, 64, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(1, 64, 64), atol=1e-5)
    # the four central pixels' rays pass within half a pixel's angle of the origin
    center_dir = dirs[0, 31:33, 31:33].mean(dim=(0, 1))
    to_origin = -cam.position[0] / cam.position[0].norm()
    assert torch.dot(center_dir / center_dir.norm(), to_origin) > math.cos(math.radians(0.5))


def test_rays_and_projection_agree():
    cam = orbit_cameras(60.0, 30.0, 2.0, 50.0, 32)
    origins, dirs = cam.rays()
    point = origins[0, 5, 20] + 1.7 * dirs[0, 5, 20]
    assert cam.project(point[None])[0, 0].tolist() == pytest.approx([20.5, 5.5], abs=1e-3)


def test_random_cameras_stay_in_their_ranges_and_are_reproducible():
    cfg = CameraConfig()
    cams = sample_random_cameras(cfg, 512, 64, torch.Generator().manual_seed(1))
    radius = cams.position.norm(dim=-1)
    assert radius.min() >= cfg.radius_range[0] - 1e-5 and radius.max() <= cfg.radius_range[1] + 1e-5
    polar = torch.rad2deg(cams.polar)
    assert polar.min() >= cfg.polar_range_deg[0] - 1e-3 and polar.max() <= cfg.polar_range_deg[1] + 1e-3
    fovy = torch.rad2deg(cams.fovy)
    assert fovy.min() >= cfg.fovy_range_deg[0] and fovy.max() <= cfg.fovy_range_deg[1]
    again = sample_random_cameras(cfg, 512, 64, torch.Generator().manual_seed(1))
    assert torch.equal(cams.c2w, again.c2w)
    # every random camera looks at the object
    centers = cams.project(torch.zeros(1, 3))[:, 0]
    assert torch.allclose(centers, torch.full_like(centers, 32.0), atol=1e-2)


def test_camera_matrices_are_rotations_even_straight_above():
    cams = orbit_cameras([0.0, 45.0, 120.0], [0.0, 90.0, -45.0], 1.2, 50.0, 16)
    rotation = cams.c2w[:, :3, :3]
    identity = torch.eye(3).expand_as(rotation)
    assert torch.allclose(rotation @ rotation.transpose(1, 2), identity, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(3), atol=1e-5)


def test_turntable_starts_at_the_reference_view_and_goes_round():
    cfg = CameraConfig()
    cams = turntable_cameras(cfg, 8, 32)
    assert torch.allclose(cams.c2w[0], reference_camera(cfg, 32).c2w[0], atol=1e-6)
    assert torch.rad2deg(cams.azimuth).tolist() == pytest.approx([45.0 * i for i in range(8)], abs=1e-4)


def test_cameras_moved_off_the_cpu_keep_their_cpu_copy_for_the_host():
    """The renderer's sample count and the prompt's direction read the cameras on the host; on a GPU that
    read would wait for it, so cameras moved there keep their CPU copy (sliced and resized with them)."""
    cams = turntable_cameras(CameraConfig(), 4, 32)
    moved = cams.to("meta")  # any device that is not the CPU
    assert moved.c2w.device.type == "meta" and moved.on_host() is cams
    assert torch.equal(moved[2].on_host().c2w, cams.c2w[2:3]) and moved.with_resolution(8).on_host().width == 8
    assert moved.to("meta").on_host() is cams
    assert cams.to("cpu").host is None and cams.on_host() is cams


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned copies)")
def test_orbit_cameras_reach_the_gpu_from_broadcast_angles():
    # a scalar radius and fovy broadcast against several azimuths are views sharing memory, which
    # pin_memory refuses: every preview of the fit went through this on the GPU
    cameras = orbit_cameras(75.0, [0.0, 90.0, 180.0], 1.8, 55.0, 16, device="cuda")
    assert cameras.fovy.device.type == "cuda" and cameras.on_host().fovy.shape == (3,)
