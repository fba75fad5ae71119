"""Ground-truth renderer: exact ray casting of a colored triangle mesh, in plain PyTorch.

Independent of the volume renderer on purpose: it shares only the `Cameras` rays, so an
error in the field, the compositing or the losses cannot hide in both. Colors are the
mesh's vertex colors interpolated at the hit point (unlit: albedo, like the field).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cameras import Cameras
from ..renderer import Lighting, shade


def embree_available() -> bool:
    try:
        import embreex  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ColoredMesh:
    """Triangles as tensors: corners [F,3,3] and their colors [F,3,3] in [0,1].

    Keeps the trimesh too when it was made from one: with Embree installed (embreex),
    trimesh casts rays about a hundred times faster than the PyTorch fallback.
    """

    corners: torch.Tensor
    colors: torch.Tensor
    source: object = None  # trimesh.Trimesh

    @property
    def face_normals(self) -> torch.Tensor:
        v0, v1, v2 = self.corners.unbind(1)
        return torch.nn.functional.normalize(torch.cross(v1 - v0, v2 - v0, dim=-1), dim=-1)

    @classmethod
    def from_trimesh(cls, mesh) -> "ColoredMesh":
        faces = np.asarray(mesh.faces)
        corners = torch.as_tensor(np.asarray(mesh.vertices)[faces], dtype=torch.float32)
        rgba = np.asarray(mesh.visual.vertex_colors)[faces][..., :3] / 255.0
        return cls(corners, torch.as_tensor(rgba, dtype=torch.float32), mesh)


@dataclass
class GroundTruthView:
    rgb: torch.Tensor  # [B,H,W,3] over white
    mask: torch.Tensor  # [B,H,W] coverage in [0,1] (fractional at edges when supersampled)
    normal: torch.Tensor  # [B,H,W,3] world-space, toward the camera; zero where empty


def intersect(origins: torch.Tensor, dirs: torch.Tensor, mesh: ColoredMesh, backend: str = "auto"):
    """Nearest hit of each ray [N,3]: distance [N] (inf on a miss), interpolated color [N,3] and the
    face normal [N,3] turned toward the camera (zero on a miss)."""
    if backend == "auto":
        backend = "embree" if mesh.source is not None and embree_available() else "torch"
    if backend == "embree":
        return _intersect_embree(origins, dirs, mesh)
    return _intersect_torch(origins, dirs, mesh)


def _intersect_embree(origins: torch.Tensor, dirs: torch.Tensor, mesh: ColoredMesh):
    from trimesh.ray.ray_pyembree import RayMeshIntersector
    from trimesh.triangles import points_to_barycentric

    o, d = origins.double().numpy(), dirs.double().numpy()
    faces, rays, points = RayMeshIntersector(mesh.source).intersects_id(o, d, multiple_hits=False,
                                                                         return_locations=True)
    distance = torch.full((o.shape[0],), float("inf"))
    color = torch.zeros(o.shape[0], 3)
    normal = torch.zeros(o.shape[0], 3)
    if len(rays):
        corners = mesh.corners[faces].double().numpy()
        bary = torch.as_tensor(points_to_barycentric(corners, points), dtype=torch.float32)
        rays_t = torch.as_tensor(rays)
        distance[rays_t] = torch.as_tensor(np.linalg.norm(points - o[rays], axis=-1), dtype=torch.float32)
        faces_t = torch.as_tensor(faces)
        color[rays_t] = (bary[..., None] * mesh.colors[faces_t]).sum(-2)
        normal[rays_t] = _facing(mesh.face_normals[faces_t], dirs[rays_t])
    return distance, color, normal


def _intersect_torch(origins: torch.Tensor, dirs: torch.Tensor, mesh: ColoredMesh, chunk: int = 1024):
    """Moller-Trumbore against every triangle: slow (rays x faces) but needs nothing beyond torch."""
    v0, v1, v2 = mesh.corners.unbind(1)  # [F,3] each
    e1, e2 = v1 - v0, v2 - v0
    distances, colors, normals = [], [], []
    for start in range(0, origins.shape[0], chunk):
        o, d = origins[start:start + chunk, None, :], dirs[start:start + chunk, None, :]  # [R,1,3]
        p = torch.cross(d.expand(-1, e2.shape[0], -1), e2.expand(d.shape[0], -1, -1), dim=-1)  # [R,F,3]
        det = (e1 * p).sum(-1)
        inv = 1.0 / torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        s = o - v0
        u = (s * p).sum(-1) * inv
        q = torch.cross(s, e1.expand_as(s), dim=-1)
        v = (d * q).sum(-1) * inv
        t = (e2 * q).sum(-1) * inv
        hit = (det.abs() > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6)
        t = torch.where(hit, t, torch.full_like(t, float("inf")))
        nearest, face = t.min(-1)  # [R]
        hit_any = torch.isfinite(nearest)[:, None]
        normals.append(torch.where(hit_any, _facing(mesh.face_normals[face], d[:, 0]), 0.0))
        rows = torch.arange(face.shape[0])
        bary = torch.stack([1 - u[rows, face] - v[rows, face], u[rows, face], v[rows, face]], -1)  # [R,3]
        color = (bary[..., None] * mesh.colors[face]).sum(-2)
        colors.append(torch.where(hit_any, color, torch.zeros_like(color)))
        distances.append(nearest)
    return torch.cat(distances), torch.cat(colors), torch.cat(normals)


def _facing(normals: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Unit normals flipped, where needed, to face against the ray (toward the camera)."""
    normals = torch.nn.functional.normalize(normals, dim=-1)
    return torch.where(((normals * dirs).sum(-1) > 0)[:, None], -normals, normals)


def render_ground_truth(mesh: ColoredMesh, cameras: Cameras, supersample: int = 2,
                        lighting: Lighting | None = None) -> GroundTruthView:
    """Render every camera; `supersample`^2 rays per pixel, box-filtered, for anti-aliased edges.

    With `lighting`, colors are shaded exactly as the volume renderer shades the field
    (same `shade` function), so a prior can compare like with like.
    """
    fine = cameras.to("cpu").with_resolution(cameras.width * supersample, cameras.height * supersample)
    origins, dirs = fine.rays()
    batch, height, width = origins.shape[:3]
    distance, color, normal = intersect(origins.reshape(-1, 3), dirs.reshape(-1, 3), mesh)
    if lighting is not None and lighting.shading != "albedo":
        light = lighting.light_dir.cpu().repeat_interleave(height * width, 0)
        color = shade(color[:, None], normal[:, None], light, lighting.shading, lighting.ambient)[:, 0]
    hit = torch.isfinite(distance).float()[:, None]
    rgb = (color * hit + (1 - hit)).reshape(batch, height, width, 3)
    planes = torch.cat([rgb, hit.reshape(batch, height, width, 1), normal.reshape(batch, height, width, 3)], -1)
    planes = torch.nn.functional.avg_pool2d(planes.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
    planes = planes.to(cameras.device)
    return GroundTruthView(planes[..., :3], planes[..., 3], planes[..., 4:])
