"""Where the object and the reference camera go in a Blender scene.

The field's world is already Blender's (Z up, cameras looking down their local -Z),
but in the field's own units and wherever the fit put the object. Export moves it
to the origin and scales it to real size; the reference camera gets the very same
move and scale, which leaves the picture it takes unchanged: it still sees the
object exactly as the photo did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SENSOR_WIDTH_MM = 36.0  # Blender's default sensor; with sensor_fit AUTO it spans the image's longer side


@dataclass
class Placement:
    """field point p -> scale * p + translation, in meters, Blender world coordinates."""

    scale: float
    translation: np.ndarray  # [3]

    @classmethod
    def for_vertices(cls, vertices: np.ndarray, size_m: float, origin: str) -> "Placement":
        """Center the vertices' box at the origin (or on it, resting on z = 0) with its longest side `size_m`."""
        low, high = vertices.min(0), vertices.max(0)
        longest = float((high - low).max())
        scale = size_m / longest if size_m > 0 and longest > 0 else 1.0
        anchor = 0.5 * (low + high)
        if origin == "bottom":
            anchor[2] = low[2]
        return cls(scale, -scale * anchor)

    def matrix(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] *= self.scale
        m[:3, 3] = self.translation
        return m

    def apply(self, points: np.ndarray) -> np.ndarray:
        return points * self.scale + self.translation

    def invert(self, points: np.ndarray) -> np.ndarray:
        return (points - self.translation) / self.scale

    def camera_to_world(self, c2w: np.ndarray) -> np.ndarray:
        """A camera pose moved with the object: same rotation, moved and scaled position."""
        moved = np.array(c2w, np.float64)
        moved[:3, 3] = self.apply(moved[:3, 3])
        return moved


def euler_xyz(rotation: np.ndarray) -> np.ndarray:
    """Blender's XYZ Euler angles (radians) of a rotation matrix: R = Rz(z) @ Ry(y) @ Rx(x)."""
    r = np.asarray(rotation, np.float64)
    cos_y = math.hypot(r[0, 0], r[1, 0])
    if cos_y > 1e-6:
        return np.array([math.atan2(r[2, 1], r[2, 2]), math.atan2(-r[2, 0], cos_y), math.atan2(r[1, 0], r[0, 0])])
    return np.array([math.atan2(-r[1, 2], r[1, 1]), math.atan2(-r[2, 0], cos_y), 0.0])  # gimbal lock


def camera_description(c2w: np.ndarray, fovy: float, width: int, height: int, placement: Placement,
                       node_name: str) -> dict:
    """camera.json: everything an importer needs to put a Blender camera where the photo was taken."""
    pose = placement.camera_to_world(c2w)
    tan_y = math.tan(0.5 * fovy)
    tan_x = tan_y * width / height
    # sensor_fit AUTO: the 36 mm sensor spans the longer side of the image
    lens = 0.5 * SENSOR_WIDTH_MM / (tan_x if width >= height else tan_y)
    distance = float(np.linalg.norm(pose[:3, 3]))
    return {
        "format": "realfusion-camera/1",
        "units": "meters",
        "up_axis": "Z",
        "gltf_node": node_name,
        "location": pose[:3, 3].tolist(),
        "rotation_euler_xyz": euler_xyz(pose[:3, :3]).tolist(),
        "matrix_world": pose.tolist(),
        "lens_mm": lens,
        "sensor_width_mm": SENSOR_WIDTH_MM,
        "sensor_fit": "AUTO",
        "fovy_rad": fovy,
        "fovy_deg": math.degrees(fovy),
        "fovx_deg": math.degrees(2.0 * math.atan(tan_x)),
        "width": width,
        "height": height,
        "clip_start": clip_start(distance),
        "clip_end": clip_end(distance),
        "object": {"scale": placement.scale, "translation": placement.translation.tolist(),
                   "field_to_object": placement.matrix().tolist()},
    }


def clip_start(distance: float) -> float:
    return max(1e-3, 0.01 * distance)


def clip_end(distance: float) -> float:
    return max(100.0, 10.0 * distance)
