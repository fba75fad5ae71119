"""Synthetic objects with known geometry and texture, framed as the pipeline frames a photo.

Each object is a procedural trimesh with vertex colors, scaled and shifted so that, seen
from the reference camera, it sits centered at `object_fraction` of the frame: the same
framing that matting gives a real photo, so the photo of it passes through matting
unchanged and the ground truth stays valid in the reconstruction's frame.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import trimesh

from ..cameras import reference_camera
from ..config import CameraConfig
from .raycast import ColoredMesh, render_ground_truth


def _paint(mesh: trimesh.Trimesh, color_of: Callable[[np.ndarray], np.ndarray]) -> trimesh.Trimesh:
    """Vertex colors from a function of position [N,3] -> RGB [N,3] in [0,1]."""
    rgb = np.clip(color_of(np.asarray(mesh.vertices)), 0.0, 1.0)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.c_[(rgb * 255).round(), np.full(len(rgb), 255)]
                                              .astype(np.uint8))
    return mesh


def _solid(rgb) -> Callable[[np.ndarray], np.ndarray]:
    return lambda points: np.tile(np.asarray(rgb, float), (len(points), 1))


def textured_box() -> trimesh.Trimesh:
    """A box whose six sides have six colors, so every view shows which way it faces."""
    box = trimesh.creation.box(extents=(0.9, 0.6, 0.5)).subdivide().subdivide()
    box.unmerge_vertices()  # corners shared by two sides get one color per side
    side_colors = np.array([(0.9, 0.2, 0.2), (0.2, 0.7, 0.3), (0.2, 0.3, 0.9),
                            (0.95, 0.8, 0.2), (0.8, 0.3, 0.8), (0.2, 0.8, 0.85)])
    normals = np.repeat(box.face_normals, 3, axis=0)  # unmerged: vertex 3f+k belongs to face f
    side = np.argmax(np.abs(normals), axis=1) * 2 + (normals[np.arange(len(normals)), np.argmax(np.abs(normals), 1)] > 0)
    order = np.argsort(box.faces.reshape(-1))
    rgb = np.empty((len(box.vertices), 3))
    rgb[box.faces.reshape(-1)[order]] = side_colors[side[order]]
    return _paint(box, lambda _points: rgb)


def mug() -> trimesh.Trimesh:
    """A mug-like solid of revolution, graded from a blue base to a red top, with a yellow handle on +X."""
    profile = np.array([(0.0, -0.45), (0.3, -0.45), (0.34, -0.4), (0.36, 0.35), (0.33, 0.42), (0.0, 0.42)])
    body = trimesh.creation.revolve(profile, sections=48)
    body = _paint(body, lambda p: np.where((p[:, 2] > 0.1)[:, None], (0.85, 0.25, 0.2),
                                           np.where((p[:, 2] > -0.05)[:, None], (0.95, 0.95, 0.9), (0.2, 0.35, 0.8))))
    handle = trimesh.creation.torus(major_radius=0.2, minor_radius=0.05, major_sections=32, minor_sections=12)
    handle.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))
    handle.apply_translation((0.36, 0.0, 0.0))
    handle = _paint(handle, _solid((0.95, 0.8, 0.2)))
    return trimesh.util.concatenate([body, handle])


def figure() -> trimesh.Trimesh:
    """An asymmetric figure: orange front with a red nose toward -Y, green back with a purple pack on +Y."""
    body = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    body.apply_scale((0.32, 0.26, 0.32))
    body = _paint(body, lambda p: np.where((p[:, 1] < 0)[:, None], (0.95, 0.55, 0.15), (0.2, 0.65, 0.3)))
    head = trimesh.creation.icosphere(subdivisions=3, radius=0.18)
    head.apply_translation((0.05, -0.02, 0.42))
    head = _paint(head, lambda p: np.where((p[:, 1] < -0.02)[:, None], (0.95, 0.85, 0.7), (0.35, 0.2, 0.1)))
    nose = trimesh.creation.cone(radius=0.06, height=0.2, sections=16)
    nose.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))  # point toward -Y
    nose.apply_translation((0.05, -0.17, 0.42))
    nose = _paint(nose, _solid((0.9, 0.1, 0.1)))
    pack = trimesh.creation.box(extents=(0.3, 0.15, 0.35)).subdivide()
    pack.apply_translation((0.0, 0.28, 0.02))
    pack = _paint(pack, _solid((0.55, 0.25, 0.75)))
    return trimesh.util.concatenate([body, head, nose, pack])


def bird() -> trimesh.Trimesh:
    """Much deeper than wide, seen head-on: a blue-breasted, cream-backed body 2.4 times as long (along the
    view axis, -Y toward the camera) as it is wide, a yellow beak pointing at the camera and a red tail
    pointing away. Framed at 80 % of the reference view it spans about +-1.4 along Y: a box of +-0.75
    cuts off the beak (even in the reference view) and flattens the back."""
    body = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    body.apply_scale((0.25, 0.36, 0.25))
    body = _paint(body, lambda p: np.where((p[:, 1] < 0)[:, None], (0.2, 0.55, 0.9), (0.9, 0.88, 0.8)))
    # The cones run on into the body, so beak and tail grow out of it (protrusions, not floaters that the
    # export's cleanup rightly drops); outside the body they are the cones of radius 0.07 / 0.06 and height
    # 0.2 that once floated 0.04 in front of and behind it, tips at y = -+0.6.
    beak = trimesh.creation.cone(radius=0.105, height=0.3, sections=16)
    beak.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))  # point toward -Y
    beak.apply_translation((0.0, -0.3, 0.03))
    beak = _paint(beak, _solid((0.95, 0.75, 0.1)))
    tail = trimesh.creation.cone(radius=0.09, height=0.3, sections=16)
    tail.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, (1, 0, 0)))  # point toward +Y
    tail.apply_translation((0.0, 0.3, 0.05))
    tail = _paint(tail, _solid((0.85, 0.15, 0.2)))
    return trimesh.util.concatenate([body, beak, tail])


OBJECTS: dict[str, Callable[[], trimesh.Trimesh]] = {"box": textured_box, "mug": mug, "figure": figure,
                                                     "bird": bird}


class FramingError(RuntimeError):
    """An object's silhouette could not be brought to the matted framing."""


def frame_for_reference(mesh: trimesh.Trimesh, camera_cfg: CameraConfig, object_fraction: float = 0.8,
                        resolution: int = 512, max_iterations: int = 30) -> trimesh.Trimesh:
    """Scale and shift `mesh` so its reference-view silhouette is centered and `object_fraction` of the frame.

    Matting measures a photo's box to the pixel at 512 px, so the framing must converge to that: the box's
    center within half a pixel and its longer side within a pixel, else the photo and the truth the oracle
    pulls toward disagree (the bird, its beak's tip 0.4 from a camera 1.8 from the center, had settled
    5.5 px off: a reference-view IoU of 0.963 at best). Under such perspective a shift moves the near tip
    several times as far as the object's center, so a fixed-point step overshoots and oscillates; this is
    Newton's method on (log scale, shift right, shift up) with the box's response measured by finite
    differences, each step bounded and halved until the error falls."""
    base = mesh.copy()
    camera = reference_camera(camera_cfg, resolution)
    c2w = camera.c2w[0].numpy()
    axes = np.stack([c2w[:3, 0], c2w[:3, 1]])  # the image's right and up, in the world
    world_per_px = np.linalg.norm(c2w[:3, 3]) / float(camera.focal_px()[0])  # at the camera's target
    target = object_fraction * resolution
    center = base.bounding_box.centroid

    def placed(params: np.ndarray) -> trimesh.Trimesh:
        moved = base.copy()
        moved.vertices = (base.vertices - center) * np.exp(params[0]) + center + params[1:] @ axes
        return moved

    def error(params: np.ndarray) -> np.ndarray:
        """(longer side - target, center's offset right, center's offset up) in pixels."""
        mask = render_ground_truth(ColoredMesh.from_trimesh(placed(params)), camera, supersample=1).mask[0]
        rows, cols = np.flatnonzero(mask.numpy().any(1) > 0.5), np.flatnonzero(mask.numpy().any(0) > 0.5)
        if len(rows) == 0:
            return np.array([-target, 0.0, 0.0])
        x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
        if x0 == 0 or y0 == 0 or x1 == resolution or y1 == resolution:
            return np.full(3, np.inf)  # clipped by the frame: its box says nothing
        return np.array([max(x1 - x0, y1 - y0) - target, (x0 + x1 - resolution) / 2,
                         (resolution - y0 - y1) / 2], dtype=float)

    def settled(err: np.ndarray) -> bool:
        return abs(err[0]) <= 1 and abs(err[1]) <= 0.5 and abs(err[2]) <= 0.5

    params = np.zeros(3)
    err = error(params)
    if not np.isfinite(err).all():
        raise FramingError("the object is larger than the reference view's frame before framing")
    size = float(max(base.extents))
    for _ in range(max_iterations):
        if settled(err):
            return placed(params)
        steps = np.array([0.02, 4 * world_per_px * size, 4 * world_per_px * size])
        jacobian = np.stack([(error(params + np.eye(3)[i] * steps[i]) - err) / steps[i] for i in range(3)], 1)
        delta = np.linalg.lstsq(jacobian, -err, rcond=None)[0]
        delta *= min(1.0, 0.3 / abs(delta[0]))  # at most 35 % larger or smaller a step: the box stays framed
        for _halving in range(8):
            trial_err = error(params + delta)
            if np.abs(trial_err).sum() < np.abs(err).sum() or settled(trial_err):
                break
            delta /= 2
        params, err = params + delta, trial_err
    if settled(err):
        return placed(params)
    raise FramingError(f"the silhouette did not settle at {object_fraction:.0%} of the frame in {max_iterations} "
                       f"steps: its longer side is off by {err[0]:.1f} px, its center by ({err[1]:.1f}, "
                       f"{err[2]:.1f}) px")


_FRAMED: dict[tuple[str, str, float], trimesh.Trimesh] = {}


def make_object(name: str, camera_cfg: CameraConfig | None = None, object_fraction: float = 0.8) -> trimesh.Trimesh:
    """`name`'s mesh framed for the reference camera; cached (the framing ray casts for a second or two, and
    the harness asks for the same object often), a fresh copy each call."""
    if name not in OBJECTS:
        raise KeyError(f"unknown object {name!r}; choose one of {', '.join(OBJECTS)}")
    camera_cfg = camera_cfg or CameraConfig()
    key = (name, repr(camera_cfg), float(object_fraction))  # CameraConfig is a mutable dataclass: keyed by value
    if key not in _FRAMED:
        _FRAMED[key] = frame_for_reference(OBJECTS[name](), camera_cfg, object_fraction)
    return _FRAMED[key].copy()


def surface_points(mesh: trimesh.Trimesh, count: int = 20000, seed: int = 0) -> np.ndarray:
    """`count` points uniformly on the surface."""
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return np.asarray(points, dtype=np.float32)


def outer_surface_points(mesh: trimesh.Trimesh, count: int = 20000, seed: int = 0) -> np.ndarray:
    """Ground-truth point cloud: `count` points uniformly on the object's outer surface.

    The harness's objects are unions of closed parts that overlap (the figure's head sits in its body, the
    bird's beak grows out of it): a point of one part inside another lies on no surface that a camera sees or a
    reconstruction could have, so it is left out (it would count as missed by every reconstruction).
    """
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    parts = [(label, mesh.submesh([np.flatnonzero(labels == label)], append=True)) for label in np.unique(labels)]
    closed = [(label, part) for label, part in parts if part.is_watertight]
    if len(closed) < 2:
        return surface_points(mesh, count, seed)
    kept, round_seed = [], seed
    while sum(len(k) for k in kept) < count:
        points, faces = trimesh.sample.sample_surface(mesh, 2 * count, seed=round_seed)
        outside = np.ones(len(points), bool)
        for label, part in closed:
            others = labels[faces] != label
            outside[others] &= ~part.contains(points[others])
        kept.append(points[outside])
        round_seed += 1_000_003
    return np.concatenate(kept)[:count].astype(np.float32)


def as_torch_mesh(mesh: trimesh.Trimesh, device="cpu") -> ColoredMesh:
    colored = ColoredMesh.from_trimesh(mesh)
    return ColoredMesh(colored.corners.to(device), colored.colors.to(device))

