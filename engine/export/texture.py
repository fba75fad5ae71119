"""Color for the mesh: a UV atlas (xatlas) and an albedo texture baked from the field.

Each texel covered by a triangle of the atlas is mapped back to its point on the
surface and colored with the field's albedo there. Texels outside every island
take the color of the nearest covered texel (dilation over the whole image), so
bilinear filtering and mipmaps never blend an island with the empty space around
it: no dark seams along the UV borders.
UVs follow glTF: (0, 0) is the image's top-left corner, v grows downward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .mesh import DensityField, query_field

RASTER_CHUNK = 1 << 21  # candidate pixels per rasterization batch (memory stays around 100 MB)
ISLAND_PADDING = 4  # texels between UV islands in xatlas' own atlas (more at the texture's size when it is larger)
# Charts of at most 1/64 of the surface: xatlas grows charts 4-6x faster (2-3 s instead of 10-15 s for 50k
# faces) for about 5% less of the texture covered.
MAX_CHART_FRACTION = 1.0 / 64.0


@dataclass
class Fragments:
    """Pixels whose centers lie inside triangles: which pixel, which triangle, where in it."""

    pixel: np.ndarray  # [N] flat index y * width + x
    face: np.ndarray  # [N]
    barycentric: np.ndarray  # [N,3], weights of the triangle's three corners


def rasterize(triangles: np.ndarray, width: int, height: int) -> Fragments:
    """Every (pixel, triangle) pair with the pixel's center (x + 0.5, y + 0.5) inside the triangle.

    `triangles` is [F,3,2] in pixel units (x right, y down). Pure numpy: each triangle's
    bounding box is enumerated and its pixels tested with edge functions, in batches.
    """
    triangles = np.asarray(triangles, np.float64)
    lo = np.clip(np.ceil(triangles.min(1) - 0.5), 0, [width, height]).astype(np.int64)
    hi = np.clip(np.floor(triangles.max(1) - 0.5), -1, [width - 1, height - 1]).astype(np.int64)
    size = np.maximum(hi - lo + 1, 0)
    count = size[:, 0] * size[:, 1]
    pixels, faces, weights = [], [], []
    total = np.concatenate([[0], np.cumsum(count)])
    start = 0
    while start < len(count):  # batches of whole triangles with at most RASTER_CHUNK candidates (or one triangle)
        end = max(int(np.searchsorted(total, total[start] + RASTER_CHUNK, side="right")) - 1, start + 1)
        ids = np.arange(start, end)
        start = end
        ids = ids[count[ids] > 0]
        if len(ids) == 0:
            continue
        face = np.repeat(ids, count[ids])
        offset = np.arange(len(face)) - np.repeat(np.cumsum(count[ids]) - count[ids], count[ids])
        x = lo[face, 0] + offset % size[face, 0]
        y = lo[face, 1] + offset // size[face, 0]
        w = _barycentric(triangles[face], np.stack([x + 0.5, y + 0.5], -1))
        inside = (w >= -1e-9).all(-1)
        pixels.append((y * width + x)[inside])
        faces.append(face[inside])
        weights.append(w[inside])
    if not pixels:
        return Fragments(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)))
    return Fragments(np.concatenate(pixels), np.concatenate(faces), np.concatenate(weights))


def _barycentric(tri: np.ndarray, p: np.ndarray) -> np.ndarray:
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    v0, v1, v2 = b - a, c - a, p - a
    det = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
    safe = np.where(np.abs(det) < 1e-12, np.inf, det)  # a degenerate triangle covers nothing
    wb = (v2[:, 0] * v1[:, 1] - v2[:, 1] * v1[:, 0]) / safe
    wc = (v0[:, 0] * v2[:, 1] - v0[:, 1] * v2[:, 0]) / safe
    wa = np.where(np.isinf(safe), -1.0, 1.0 - wb - wc)
    return np.stack([wa, wb, wc], -1)


@dataclass
class UVMesh:
    """The mesh split along UV seams: `source[i]` is the original vertex that vertex i copies."""

    source: np.ndarray  # [V'] indices into the original vertices
    faces: np.ndarray  # [F,3] into the new vertices
    uv: np.ndarray  # [V',2] glTF convention, in [0,1]


def unwrap(vertices: np.ndarray, faces: np.ndarray) -> UVMesh:
    """Charts and packing by xatlas; one atlas, square-ish, islands `ISLAND_PADDING` texels apart."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    charts = xatlas.ChartOptions()
    corners = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=-1).sum()
    charts.max_chart_area = float(area * MAX_CHART_FRACTION)
    pack = xatlas.PackOptions()
    pack.padding = ISLAND_PADDING
    pack.bilinear = True
    pack.blockAlign = True  # much faster packing, at a few percent of texture space
    atlas.generate(charts, pack)
    source, new_faces, uv = atlas[0]
    return UVMesh(source.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float64))


@torch.no_grad()
def albedo_at(field: DensityField, points: np.ndarray, device="cpu") -> np.ndarray:
    """The field's albedo at world points [N,3], as float [N,3] in [0,1]."""
    if len(points) == 0:
        return np.zeros((0, 3), np.float32)
    tensor = torch.as_tensor(points, dtype=torch.float32)
    albedo = torch.cat([out[1] for out in query_field(field, tensor, device)])
    return albedo.clamp(0.0, 1.0).numpy()


def bake_albedo(field: DensityField, vertices: np.ndarray, uv_mesh: UVMesh, size: int, device="cpu") -> np.ndarray:
    """An RGB float texture [size,size,3]: the albedo at each texel's surface point, dilated past the islands.

    `vertices` are the original vertices in field coordinates (where `field` is queried).
    """
    corners_uv = uv_mesh.uv[uv_mesh.faces] * size  # [F,3,2], pixel units
    fragments = rasterize(corners_uv, size, size)
    corners_xyz = vertices[uv_mesh.source[uv_mesh.faces]]  # [F,3,3]
    points = np.einsum("nk,nkc->nc", fragments.barycentric, corners_xyz[fragments.face])
    texture = np.zeros((size * size, 3), np.float32)
    texture[fragments.pixel] = albedo_at(field, points, device)
    covered = np.zeros(size * size, bool)
    covered[fragments.pixel] = True
    return dilate(texture.reshape(size, size, 3), covered.reshape(size, size))


def dilate(image: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every pixel not `covered` takes the value of the nearest covered pixel."""
    from scipy import ndimage

    if covered.all() or not covered.any():
        return image
    nearest = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
    return image[nearest[0], nearest[1]]
