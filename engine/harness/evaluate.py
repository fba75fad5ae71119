"""`realfusion eval OUTDIR`: score an exported reconstruction against its ground truth, as the paper does.

Reads what `reconstruct` + `export` left in OUTDIR (mesh.glb or mesh.obj, camera.json,
reference.png) and a ground truth (OUTDIR/ground_truth/mesh.ply + points.npy, which
`realfusion demo` writes), and writes
- eval.json: F-score at 0.05 and Chamfer distance after scale estimation and ICP (see
  `metrics` for the normalization), PSNR/SSIM of the textured mesh in the reference view
  against reference.png over white, PSNR/SSIM in N turntable views against the ground
  truth's renders, with the settings and the versions that produced them;
- eval.png: a contact sheet, row 1 the input, row 2 the reconstruction from the N views,
  row 3 the ground truth from the same views.

The exported mesh is in Blender's world (centered, meters): camera.json's `object` transform
maps it back into the field's frame, where the ground truth and the cameras live. The cameras
come from camera.json too: the reference camera, and N views at its elevation and distance
starting at its azimuth (view 0 *is* the reference view; views 1..N-1 are the novel ones).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from .. import __version__
from ..cameras import Cameras, orbit_cameras
from ..errors import EngineError
from ..export import CAMERA_FILE, MESH_STEM, REPORT_FILE
from ..export.gltf import Z_UP_TO_Y_UP
from ..export.placement import Placement
from ..matting import REFERENCE_NAME
from ..outputs import FIELD_REFERENCE_FILE
from ..outputs import atomic_write_json, image_grid, save_png
from . import metrics
from .demo import GROUND_TRUTH_DIR
from .mesh_render import box_downsample, render_mesh
from .objects import outer_surface_points
from .raycast import ColoredMesh, render_ground_truth

EVAL_FILE, SHEET_FILE = "eval.json", "eval.png"
GT_MESH, GT_POINTS = "mesh.ply", "points.npy"
INPUT_NAMES = ("input.png", "input.jpg", "input.jpeg")  # what `demo` calls the photo; else reference.png
DEFAULT_VIEWS, DEFAULT_RESOLUTION, SUPERSAMPLE = 8, 256, 2
DEFAULT_POINTS = 20000  # sampled on the mesh when the ground truth has no points.npy


class EvaluationError(EngineError):
    """Something `realfusion eval` needs is missing or unreadable."""


@dataclass
class ExportedMesh:
    """The exported mesh read back, in the field's frame (where the ground truth and the cameras are)."""

    path: Path
    vertices: np.ndarray  # [V,3]
    faces: np.ndarray  # [F,3]
    uv: np.ndarray | None  # [V,2] glTF convention
    texture: np.ndarray | None  # [h,w,3] float in [0,1]
    colors: np.ndarray  # [V,3] in [0,1], used when there is no texture
    camera: dict  # camera.json

    def render(self, cameras: Cameras, supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
        """Albedo over white [B,H,W,3] and coverage [B,H,W], anti-aliased by `supersample`^2 samples a pixel."""
        fine = cameras.with_resolution(cameras.width * supersample, cameras.height * supersample)
        rgb, mask = render_mesh(self.vertices, self.faces, fine, self.uv, self.texture, self.colors)
        return box_downsample(rgb, supersample), box_downsample(mask.astype(np.float64), supersample)


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise EvaluationError(f"{what} is missing ({path}).", fix)
    return path


def load_exported_mesh(outdir: Path) -> ExportedMesh:
    outdir = Path(outdir)
    export_fix = f"Run `realfusion export {outdir}` first (or `realfusion reconstruct` into it)."
    name = None
    if (outdir / REPORT_FILE).is_file():
        try:
            name = json.loads((outdir / REPORT_FILE).read_text()).get("mesh")
        except (OSError, json.JSONDecodeError):
            name = None
    if not name or not (outdir / name).is_file():
        name = next((f"{MESH_STEM}.{ext}" for ext in ("glb", "obj") if (outdir / f"{MESH_STEM}.{ext}").is_file()),
                    f"{MESH_STEM}.glb")
    path = _require(outdir / name, "The exported mesh", export_fix)
    camera_path = _require(outdir / CAMERA_FILE, f"The reference camera ({CAMERA_FILE})", export_fix)
    try:
        camera = json.loads(camera_path.read_text())
        placement = Placement(float(camera["object"]["scale"]), np.asarray(camera["object"]["translation"], float))
        _ = camera["matrix_world"], camera["fovy_rad"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"{camera_path} is not a RealFusion camera file ({type(exc).__name__}: {exc}).",
                              export_fix) from exc
    try:
        loaded = trimesh.load(path, process=False)
        geometries = list(loaded.geometry.values()) if isinstance(loaded, trimesh.Scene) else [loaded]
        if len(geometries) != 1 or not len(geometries[0].faces):
            raise ValueError(f"{len(geometries)} meshes, expected one with faces")
        mesh = geometries[0]
    except Exception as exc:  # a torn or foreign file: say which, not a traceback
        raise EvaluationError(f"{path} could not be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).",
                              export_fix) from exc
    # Written Y up (glTF, OBJ): back to Z up, then from meters to the field's frame.
    vertices = placement.invert(np.asarray(mesh.vertices, np.float64) @ Z_UP_TO_Y_UP)
    uv, texture, colors = _mesh_colors(mesh)
    return ExportedMesh(path, vertices, np.asarray(mesh.faces, np.int64), uv, texture, colors, camera)


def _mesh_colors(mesh) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(uv in glTF convention, texture) of a textured mesh, and per-vertex colors (gray where unknown)."""
    visual = mesh.visual
    colors = np.full((len(mesh.vertices), 3), 0.5)
    if isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind == "vertex":
        return None, None, np.asarray(visual.vertex_colors, np.float64)[:, :3] / 255.0
    if not isinstance(visual, trimesh.visual.TextureVisuals):
        return None, None, colors
    stored = visual.vertex_attributes.get("color")  # glTF COLOR_0 next to a material
    if stored is not None and len(stored) == len(mesh.vertices):
        stored = np.asarray(stored, np.float64)[:, :3]
        colors = stored / 255.0 if stored.max() > 1.0 else stored
    material = visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if visual.uv is None or image is None:
        return None, None, colors
    uv = np.asarray(visual.uv, np.float64).copy()
    uv[:, 1] = 1.0 - uv[:, 1]  # trimesh keeps OpenGL's v (up); the renderer takes glTF's (down)
    return uv, np.asarray(image.convert("RGB"), np.float64) / 255.0, colors


def reference_pose(camera: dict) -> tuple[np.ndarray, float]:
    """The reference camera's camera-to-world matrix in the field's frame, and its vertical fov (radians)."""
    c2w = np.asarray(camera["matrix_world"], np.float64)
    placement = Placement(float(camera["object"]["scale"]), np.asarray(camera["object"]["translation"], float))
    c2w[:3, 3] = placement.invert(c2w[:3, 3])
    return c2w, float(camera["fovy_rad"])


def field_reference_scores(outdir: Path, ref_rgb: np.ndarray, ref_alpha: np.ndarray) -> dict | None:
    """PSNR and mask IoU of the radiance field itself in the reference view (FIELD_REFERENCE_FILE, written by
    `reconstruct` at the fit's reference render size), against the input at that size; None without it."""
    path = outdir / FIELD_REFERENCE_FILE
    if not path.is_file():
        return None
    field_rgb, field_alpha = over_white(path)
    size = field_rgb.shape[0]
    target_rgb, target_alpha = resized(ref_rgb, size), resized(ref_alpha, size)
    union = np.maximum(field_alpha, target_alpha).sum()
    return {"psnr": metrics.psnr(field_rgb, target_rgb), "ssim": metrics.ssim(field_rgb, target_rgb),
            "mask_iou": float(np.minimum(field_alpha, target_alpha).sum() / union) if union else 1.0,
            "resolution": size}


def evaluation_cameras(camera: dict, views: int, resolution: int,
                       object_radius: float = 0.0) -> tuple[Cameras, Cameras, dict]:
    """(the reference camera, `views` turntable cameras from it, their angles) at `resolution` pixels square.

    The turntable keeps the reference elevation and field of view; it stands back as far as it takes to
    see a ball of `object_radius` about the origin whole (at least at the reference distance), so a
    deep object seen from the side is not cut off by the frame.
    """
    c2w, fovy = reference_pose(camera)
    reference = Cameras(torch.tensor(c2w, dtype=torch.float32)[None], torch.tensor([fovy]), resolution, resolution)
    x, y, z = c2w[:3, 3]
    distance = float(np.linalg.norm(c2w[:3, 3]))
    radius = max(distance, 1.05 * object_radius / math.sin(fovy / 2))
    polar = math.degrees(math.acos(float(np.clip(z / radius, -1.0, 1.0))))
    azimuth = math.degrees(math.atan2(x, -y))  # azimuth 0 on -Y (cameras.spherical_to_position)
    azimuths = [azimuth + 360.0 * i / views for i in range(views)]
    turntable = orbit_cameras(polar, azimuths, radius, math.degrees(fovy), resolution)
    return reference, turntable, {"polar_deg": polar, "azimuths_deg": azimuths, "radius": radius,
                                  "fovy_deg": math.degrees(fovy)}


def load_ground_truth(folder: Path) -> tuple[object, np.ndarray, bool]:
    """The true mesh (trimesh, vertex colors), its surface points, and whether the points came from points.npy."""
    folder = Path(folder)
    fix = ("Pass --ground-truth DIR, a folder with mesh.ply (vertex colors) and points.npy as `realfusion demo` "
           f"writes in OUTDIR/{GROUND_TRUTH_DIR}.")
    mesh_path = _require(folder / GT_MESH, "The ground-truth mesh", fix)
    try:
        mesh = trimesh.load(mesh_path, process=False, force="mesh")
        if not len(mesh.faces):
            raise ValueError("no faces")
        points_path = folder / GT_POINTS
        points = np.load(points_path) if points_path.is_file() else None
        if points is not None and (points.ndim != 2 or points.shape[1] != 3 or not len(points)):
            raise ValueError(f"{GT_POINTS} holds an array of shape {points.shape}, not [N,3]")
    except Exception as exc:
        raise EvaluationError(f"The ground truth in {folder} could not be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}).", fix) from exc
    if points is None:
        return mesh, outer_surface_points(mesh, DEFAULT_POINTS).astype(np.float64), False
    return mesh, np.asarray(points, np.float64), True


def over_white(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image file as float RGB [H,W,3] composited over white, and its alpha [H,W] (ones without one)."""
    image = np.asarray(Image.open(path).convert("RGBA"), np.float64) / 255.0
    alpha = image[..., 3]
    return image[..., :3] * alpha[..., None] + (1.0 - alpha[..., None]), alpha


def resized(image: np.ndarray, size: int) -> np.ndarray:
    """A float image [H,W] or [H,W,C] in [0,1] scaled (area-averaged) to fit a `size` square, letterboxed on white."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    channels = image[..., None] if image.ndim == 2 else image
    planes = [np.asarray(Image.fromarray(channels[..., c].astype(np.float32)).resize(new, Image.BOX))
              for c in range(channels.shape[-1])]
    out = np.ones((size, size, channels.shape[-1]))
    top, left = (size - new[1]) // 2, (size - new[0]) // 2
    out[top:top + new[1], left:left + new[0]] = np.stack(planes, -1)
    return np.clip(out[..., 0] if image.ndim == 2 else out, 0.0, 1.0)


def _finite(value):
    """JSON has no infinity: an infinite PSNR (identical images) is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def versions() -> dict:
    import PIL
    import scipy

    return {"realfusion": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "torch": torch.__version__, "trimesh": trimesh.__version__,
            "pillow": PIL.__version__}


def evaluate(outdir: Path, ground_truth: Path | None = None, views: int = DEFAULT_VIEWS,
             resolution: int = DEFAULT_RESOLUTION, threshold: float = metrics.F_SCORE_THRESHOLD,
             supersample: int = SUPERSAMPLE, seed: int = 1) -> dict:
    """Score the reconstruction in `outdir`; write eval.json and eval.png there and return what eval.json holds."""
    started = time.perf_counter()
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise EvaluationError(f"There is no folder {outdir}.",
                              "Pass the folder that `realfusion reconstruct` or `realfusion demo` wrote.")
    if views < 1 or not 16 <= resolution <= 2048 or supersample < 1 or not threshold > 0:
        raise EvaluationError(f"Evaluation settings views={views}, resolution={resolution}, supersample="
                              f"{supersample}, threshold={threshold} are out of range.",
                              "Use --views 1 or more and a --resolution from 16 to 2048.")
    gt_dir = Path(ground_truth) if ground_truth is not None else outdir / GROUND_TRUTH_DIR
    reference_path = _require(outdir / REFERENCE_NAME, "The reference image",
                              "Run `realfusion reconstruct` (or `realfusion demo`) into this folder: it writes "
                              f"{REFERENCE_NAME}.")
    mesh = load_exported_mesh(outdir)
    gt_mesh, gt_points, gt_points_stored = load_ground_truth(gt_dir)
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now

    # geometry: points on the reconstructed mesh against the true points, in the field's frame (`seed` differs
    # from the one the true points were sampled with, or a perfect mesh would give the very same points)
    pred_points = metrics.surface_points(trimesh.Trimesh(mesh.vertices, mesh.faces, process=False), len(gt_points),
                                         seed).astype(np.float64)
    geometry = metrics.score_geometry(pred_points, gt_points, threshold)
    lap("geometry")

    # reference view: the textured mesh against the (matted) input, both over white, at the input's size
    ref_rgb, ref_alpha = over_white(reference_path)
    object_radius = float(np.linalg.norm(gt_points, axis=1).max())
    reference, turntable, angles = evaluation_cameras(mesh.camera, views, resolution, object_radius)
    reference = reference.with_resolution(ref_rgb.shape[1], ref_rgb.shape[0])
    (rendered,), (coverage,) = mesh.render(reference, supersample)
    union = np.maximum(ref_alpha, coverage).sum()  # soft IoU of the anti-aliased silhouettes: no ties at 0.5
    reference_scores = {"psnr": metrics.psnr(rendered, ref_rgb), "ssim": metrics.ssim(rendered, ref_rgb),
                        "mask_iou": float(np.minimum(ref_alpha, coverage).sum() / union) if union else 1.0}
    field_scores = field_reference_scores(outdir, ref_rgb, ref_alpha)
    if field_scores is not None:
        reference_scores["field"] = field_scores
    lap("reference_view")

    # novel views: the textured mesh against the true mesh, ray cast from the same cameras
    ours, _ = mesh.render(turntable, supersample)
    truth = render_ground_truth(ColoredMesh.from_trimesh(gt_mesh), turntable, supersample).rgb.numpy()
    per_view = [{"azimuth_deg": az, "psnr": metrics.psnr(a, b), "ssim": metrics.ssim(a, b)}
                for az, a, b in zip(angles["azimuths_deg"], ours, truth)]
    novel = per_view[1:] or per_view
    novel_scores = {"psnr": float(np.mean([v["psnr"] for v in novel])),
                    "ssim": float(np.mean([v["ssim"] for v in novel])),
                    "psnr_all_views": float(np.mean([v["psnr"] for v in per_view])), "per_view": per_view}
    lap("novel_views")

    input_path = next((outdir / n for n in INPUT_NAMES if (outdir / n).is_file()), reference_path)
    sheet = contact_sheet(resized(over_white(input_path)[0], resolution), ours, truth)
    save_png(outdir / SHEET_FILE, sheet)
    lap("contact_sheet")

    result = {
        "format": "realfusion-eval/1",
        "outdir": str(outdir.resolve()),
        "inputs": {"mesh": mesh.path.name, "reference": reference_path.name, "input": input_path.name,
                   "ground_truth": str(gt_dir.resolve()),
                   "ground_truth_points": GT_POINTS if gt_points_stored else f"{len(gt_points)} sampled on {GT_MESH}",
                   "mesh_faces": int(len(mesh.faces)), "mesh_textured": mesh.texture is not None},
        "geometry": geometry.as_dict(),
        "reference_view": reference_scores,
        "novel_views": novel_scores,
        "settings": {
            "fscore_threshold": threshold,
            "normalization": metrics.NORMALIZATION,
            "alignment": "scale estimation (centroids, RMS radius) then ICP with a similarity transform (Umeyama), "
                         f"symmetric nearest neighbors, at most {metrics.ICP_POINTS} points a cloud, also from the "
                         "unaligned pose; the closer result kept",
            "chamfer": "mean of the two directions' mean nearest-neighbor distances (L1), normalized units",
            "points": {"predicted": int(len(pred_points)), "ground_truth": int(len(gt_points)), "seed": seed},
            "images": "albedo over white, whole image, data range 1; PSNR null where infinite (identical); "
                      "mask_iou: soft IoU of the reference alpha and the rendered coverage",
            "ssim": "Gaussian window sigma 1.5 (11 taps), K1 0.01, K2 0.03 (Wang et al. 2004)",
            "views": views,
            "novel_views": "turntable views 1..N-1 (view 0 is the reference camera)",
            "resolution": resolution,
            "reference_resolution": [int(reference.width), int(reference.height)],
            "supersample": supersample,
            "cameras": angles,
        },
        "versions": versions(),
        "timings": timings,
        "seconds": round(time.perf_counter() - started, 3),
    }
    result = _finite(result)
    atomic_write_json(outdir / EVAL_FILE, result)
    return result


def contact_sheet(input_rgb: np.ndarray, reconstruction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Rows: the input (then blank), the reconstruction's views, the ground truth's views; tiles of one size."""
    blank = np.ones_like(input_rgb)
    first = [input_rgb] + [blank] * (len(reconstruction) - 1)
    return image_grid([first, list(reconstruction), list(truth)])


def summary(result: dict) -> str:
    """One line for the terminal."""
    g, r, n = result["geometry"], result["reference_view"], result["novel_views"]
    fmt = lambda v, spec: "inf" if v is None else format(v, spec)  # noqa: E731
    return (f"F-score@{g['threshold']:g} {g['fscore']:.3f}, Chamfer {g['chamfer']:.4f}, reference PSNR "
            f"{fmt(r['psnr'], '.2f')} SSIM {r['ssim']:.3f}, novel-view PSNR {fmt(n['psnr'], '.2f')} SSIM "
            f"{n['ssim']:.3f}")
