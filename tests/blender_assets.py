"""Files the add-on's tests feed to Blender, made here with trimesh and Pillow (the engine's environment).

A textured GLB of a known object and the camera.json of a known reference view, so the
importer can be checked against numbers worked out by hand: a sphere of radius 0.5 at the
origin with a small cube on its +X side, seen from the front (-Y), 15 degrees up, 1.8 m
away, with a 55 degree vertical field of view, which is the engine's reference camera.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from synthetic_images import rgba_disc

SPHERE_RADIUS = 0.5
MARKER_CENTER = (0.62, 0.0, 0.0)  # Blender coordinates: on the right of the sphere seen from the front
MARKER_SIZE = 0.12
CAMERA_RADIUS = 1.8
CAMERA_ELEVATION_DEG = 15.0
CAMERA_FOVY_DEG = 55.0
IMAGE_SIZE = 256


def _checker(size: int = 64) -> Image.Image:
    ys, xs = np.mgrid[0:size, 0:size] // 8
    pixels = np.where(((xs + ys) % 2 == 0)[..., None], (230, 120, 30), (30, 90, 200)).astype(np.uint8)
    return Image.fromarray(pixels)


def textured_glb(path: Path) -> Path:
    """The sphere + marker cube as one textured mesh with the reference camera as a camera node, written by
    the engine's own GLB writer (so the add-on is checked against what the exporter really writes)."""
    from engine.export.gltf import CameraData, MeshData, glb_bytes

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=SPHERE_RADIUS)
    cube = trimesh.creation.box(extents=[MARKER_SIZE] * 3)
    cube.apply_translation(MARKER_CENTER)
    mesh = trimesh.util.concatenate([sphere, cube])
    vertices = np.asarray(mesh.vertices)
    uv = np.stack([0.5 + np.arctan2(vertices[:, 1], vertices[:, 0]) / (2 * np.pi),
                   0.5 - vertices[:, 2] / (2 * SPHERE_RADIUS)], axis=1)
    data = MeshData(vertices=vertices, normals=np.asarray(mesh.vertex_normals), faces=np.asarray(mesh.faces),
                    uv=uv, texture=np.asarray(_checker()))
    camera = CameraData(c2w=camera_matrix(), fovy=math.radians(CAMERA_FOVY_DEG), aspect=1.0)
    path.write_bytes(glb_bytes(data, camera))
    return path


def camera_matrix() -> np.ndarray:
    """World matrix of a Blender camera (looks down its -Z, +Y up) at the reference view."""
    elevation = math.radians(CAMERA_ELEVATION_DEG)
    location = np.array([0.0, -CAMERA_RADIUS * math.cos(elevation), CAMERA_RADIUS * math.sin(elevation)])
    forward = -location / np.linalg.norm(location)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = right, up, -forward, location
    return matrix


def camera_lens_mm(sensor_width: float = 36.0) -> float:
    return (sensor_width / 2) / math.tan(math.radians(CAMERA_FOVY_DEG) / 2)  # square image: fovx == fovy


def camera_json(path: Path) -> Path:
    """camera.json as the engine's exporter writes it (its own function, with the object left in place)."""
    from engine.export.placement import Placement, camera_description

    description = camera_description(camera_matrix(), math.radians(CAMERA_FOVY_DEG), IMAGE_SIZE, IMAGE_SIZE,
                                     Placement(1.0, np.zeros(3)), "reference_camera")
    path.write_text(json.dumps(description, indent=2))
    return path


def expected_sphere_radius_fraction() -> float:
    """The sphere's silhouette radius over half the frame's height, for the camera above."""
    half_angle = math.asin(SPHERE_RADIUS / CAMERA_RADIUS)
    return math.tan(half_angle) / math.tan(math.radians(CAMERA_FOVY_DEG) / 2)


def build(folder: Path) -> dict:
    """Every asset the in-Blender checks use; returns their paths and the numbers to expect."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = rgba_disc(folder / "photo.png", size=64)
    Image.open(photo).convert("RGB").save(folder / "photo.jpg", quality=90)
    _checker(32).save(folder / "preview.png")
    Image.open(photo).save(folder / "reference.png")
    Image.open(photo).save(folder / "photo.bmp")  # not PNG/JPEG: the add-on converts it
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return {
        "folder": str(folder),
        "photo_png": str(photo),
        "photo_jpg": str(folder / "photo.jpg"),
        "photo_bmp": str(folder / "photo.bmp"),
        "broken_png": str(folder / "broken.png"),
        "preview_png": str(folder / "preview.png"),
        "reference_png": str(folder / "reference.png"),
        "mesh_glb": str(textured_glb(folder / "mesh.glb")),
        "camera_json": str(camera_json(folder / "camera.json")),
        "camera_matrix": camera_matrix().tolist(),
        "camera_lens": camera_lens_mm(),
        "sphere_radius_fraction": expected_sphere_radius_fraction(),
        "marker_center": list(MARKER_CENTER),
        "image_size": IMAGE_SIZE,
    }
