"""What the texture bake reads: the field itself, or, for ConRad, its constrained field seeing the mesh.

A constrained field (engine/fields/constrained.py) gives the photo's color to every point on or in front of
the visible surface, with that surface's depth estimated from the field's own density. The exported mesh is
an iso-surface of that density, which does not lie where the estimate does: where a soft or thin part (a
bird's beak) absorbs most of a ray at densities below the mesh's level, the estimated surface is in that
part, the mesh's surface behind it, so the mesh's front took the field's own albedo instead of the photo's
(the bird's mesh showed 16 dB in the reference view against 27 for the field). Baking from the mesh's own
depth in the reference view makes every texel the reference camera sees take the photo's pixel there.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cameras import Cameras
from ..fields.constrained import EMPTY_DEPTH, ConstrainedField
from .texture import rasterize

DEPTH_SUPERSAMPLE = 2  # the mesh's depth map has this many pixels a side per photo pixel
NEAR_PLANE = 1e-3  # world units in front of the camera


def mesh_depth(vertices: np.ndarray, faces: np.ndarray, camera: Cameras) -> np.ndarray:
    """Depth [H,W] along `camera[0]`'s axis of the nearest face through each pixel center (perspective-correct,
    z-buffered); EMPTY_DEPTH where no face covers the pixel. Faces reaching behind the camera's near plane
    are left out (the photo sees nothing there; their projection would fold over the image)."""
    height, width = camera.height, camera.width
    points = torch.as_tensor(vertices, dtype=torch.float32)
    pixels = camera[0].project(points)[0].numpy()
    w2c = torch.linalg.inv(camera.c2w[0])
    z = -(points @ w2c[:3, :3].T + w2c[:3, 3])[:, 2].double().numpy()
    depth = np.full(height * width, EMPTY_DEPTH)
    faces = faces[(z[faces] > NEAR_PLANE).all(1)]
    fragments = rasterize(pixels[faces], width, height)
    if len(fragments.pixel):
        inverse = (fragments.barycentric / z[faces[fragments.face]]).sum(-1)  # 1/z is linear on the screen
        np.minimum.at(depth, fragments.pixel, 1.0 / inverse)
    return depth.reshape(height, width)


def bake_source(field, vertices: np.ndarray, faces: np.ndarray):
    """The field whose albedo the texture takes: a ConstrainedField with the mesh's own depth map in the
    reference view (at DEPTH_SUPERSAMPLE times the photo's size), any other field as it is."""
    if not isinstance(field, ConstrainedField):
        return field
    camera = field.camera().to("cpu").with_resolution(field.width * DEPTH_SUPERSAMPLE,
                                                       field.height * DEPTH_SUPERSAMPLE)
    depth = mesh_depth(vertices, faces, camera)
    return field.with_depth(torch.as_tensor(depth, dtype=torch.float32))
