"""Export: the reconstructed field as a textured mesh with its reference camera, ready for Blender.

`export(outdir)` reads `field.pt` from a reconstruction's folder and writes there
- `mesh.glb` (or `mesh.obj` + `mesh.mtl` + `mesh_albedo.png`): a closed mesh, Z up
  once imported, centered at the origin and scaled to real size (meters), with
  a baked albedo texture as its PBR base color (or vertex colors), and, in the
  GLB, the reference camera as a camera node;
- `camera.json`: that camera in Blender's terms (location, rotation, lens, sensor,
  image size) and the transform applied to the object;
- `export.json`: faces, vertices, file size, the density level used, timings.
`export_field` does the same for any field (see `mesh.DensityField`) and camera.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cameras import Cameras, reference_camera
from ..config import ExportConfig, ReconstructionConfig
from ..errors import ExportError
from ..outputs import STATUS_FILE, OutputDir, atomic_write_bytes, atomic_write_json, to_uint8
from ..device import resolve_device
from ..field_file import FIELD_FILE, load_field
from ..methods import method_for
from ..progress import Progress, ProgressCallback
from .bake import bake_source
from .gltf import CameraData, MeshData, glb_bytes, obj_files
from .mesh import DensityField, Outline, camera_sight_lines, extract_surface, object_bound
from .placement import Placement, camera_description
from .texture import albedo_at, bake_albedo, unwrap

MESH_STEM = "mesh"
CAMERA_FILE = "camera.json"
REPORT_FILE = "export.json"
FORMATS = ("glb", "obj")
ORIGINS = ("center", "bottom")
CAVITY_SIGHTS = ("cameras", "axes")  # which lines of sight decide that a void is seen (mesh.clean_occupancy)
MESH_NODE, CAMERA_NODE = "realfusion_object", "reference_camera"
STEPS = ("density", "surface", "decimate", "unwrap", "color", "write")
OUTLINE_PIXELS = 128  # the reference mask is matched at most this many pixels a side (see mesh.outline_level)


@dataclass
class ExportResult:
    mesh_path: Path
    files: list[Path]  # everything written, mesh files first
    faces: int
    vertices: int
    file_bytes: int  # the mesh files together (GLB: the one file, with its texture)
    threshold: float  # the density level of the surface
    seconds: float
    watertight: bool


def check_config(cfg: ExportConfig) -> None:
    def refuse(problem: str, fix: str):
        raise ExportError(f"Export setting {problem}.", fix)

    if cfg.format not in FORMATS:
        refuse(f"format={cfg.format!r} is not one of {', '.join(FORMATS)}", "Use --format glb or --format obj.")
    if not 16 <= cfg.resolution <= 1024:
        refuse(f"resolution={cfg.resolution} is out of range", "Use a --resolution from 16 to 1024 (256 is plenty).")
    if not 16 <= cfg.texture_size <= 8192:
        refuse(f"texture_size={cfg.texture_size} is out of range", "Use a --texture size from 16 to 8192 pixels.")
    if cfg.max_faces < 0 or 0 < cfg.max_faces < 100:
        refuse(f"max_faces={cfg.max_faces} is too few", "Use --faces 100 or more (or 0 to keep every face).")
    if cfg.object_size_m < 0:
        refuse(f"object_size_m={cfg.object_size_m} is negative", "Use a --size in meters (0 keeps the field's units).")
    if cfg.origin not in ORIGINS:
        refuse(f"origin={cfg.origin!r} is not one of {', '.join(ORIGINS)}", "Use --set export.origin=center.")
    if cfg.cavity_sight not in CAVITY_SIGHTS:
        refuse(f"cavity_sight={cfg.cavity_sight!r} is not one of {', '.join(CAVITY_SIGHTS)}",
               "Use --set export.cavity_sight=cameras.")


def export(outdir: Path, cfg: ExportConfig | None = None, *, device: str | torch.device | None = None,
           report: ProgressCallback | None = None, **changes) -> ExportResult:
    """Export the field a reconstruction left in `outdir`.

    `cfg` defaults to the export settings the reconstruction was made with (its config in
    field.pt); `changes` replace single settings of it, e.g. ``resolution=128``.
    """
    outdir = Path(outdir)
    path = outdir / FIELD_FILE
    if not path.is_file():
        raise ExportError(f"There is no {FIELD_FILE} in {outdir}, so nothing to export.",
                          "Run `realfusion reconstruct IMAGE -o FOLDER` first and export that folder.")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    try:
        field, run_cfg = load_field(path, dev)  # as its method draws it (ConRad: the constrained field)
    except Exception as exc:  # a torn or foreign file: say which, not a traceback
        raise ExportError(f"{path} could not be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).",
                          "Run `realfusion reconstruct` again into this folder to write it anew.") from exc
    export_cfg = dataclasses.replace(cfg or run_cfg.export, **changes)
    camera = reference_camera(run_cfg.camera, run_cfg.matting.image_size)
    sight_lines = camera_sight_lines(run_cfg.camera.polar_range_deg[1]) if export_cfg.cavity_sight == "cameras" else None
    result = export_field(field, run_cfg.field.bound, camera, outdir, export_cfg, device=dev, report=report,
                          outline=_reference_outline(outdir, run_cfg), sight_lines=sight_lines)
    _note_in_status(outdir, result)
    return result


def _reference_outline(outdir: Path, run_cfg: ReconstructionConfig) -> Outline | None:
    """The reference camera and the object's mask (reference_mask.png), which the field's rendered opacity
    was fitted to: the mesh's outline is matched to it. None when the folder has no readable mask."""
    from PIL import Image

    from ..matting import MASK_NAME

    try:
        with Image.open(Path(outdir) / MASK_NAME) as image:
            mask = method_for(run_cfg.method).outline_mask(image.convert("L"), run_cfg)  # ConRad may grow it
            size = min(OUTLINE_PIXELS, mask.width)
            mask = np.asarray(mask.resize((size, size), Image.BOX), np.float32) / 255.0 > 0.5
    except (OSError, ValueError):
        return None
    return Outline(reference_camera(run_cfg.camera, size), mask)


def export_field(field: DensityField, bound: float, camera: Cameras, outdir: Path, cfg: ExportConfig, *,
                 device="cpu", report: ProgressCallback | None = None,
                 outline: Outline | None = None, sight_lines: np.ndarray | None = None) -> ExportResult:
    """Mesh, color and camera of `field` (seen from `camera[0]`, the reference view) into `outdir`.

    With an `outline` (the reference camera and the object's mask), the surface level is the one whose
    outline covers the mask (mesh.outline_level); without, the level where head-on rays are half opaque.
    `sight_lines` ([K,3], toward the cameras) decide which voids no camera sees (mesh.clean_occupancy); without,
    the six axes do."""
    import trimesh

    check_config(cfg)
    report = report or (lambda _p: None)
    out = OutputDir(outdir)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [started]

    def progress(step: str) -> None:
        now = time.perf_counter()
        timings[step] = round(now - clock[0], 3)
        clock[0] = now
        report(Progress("export", STEPS.index(step) + 1, len(STEPS)))

    report(Progress("export", 0, len(STEPS)))
    surface = extract_surface(field, object_bound(field, bound, device), cfg.resolution, cfg.max_faces,
                              cfg.min_component_fraction, device, progress, outline,
                              round(cfg.cavity_closing * cfg.resolution), sight_lines)
    placement = Placement.for_vertices(surface.vertices, cfg.object_size_m, cfg.origin)
    normals = trimesh.Trimesh(surface.vertices, surface.faces, process=False).vertex_normals
    colors = bake_source(field, surface.vertices, surface.faces)  # ConRad: the photo on what the camera sees of the mesh
    if cfg.vertex_colors:
        data = MeshData(placement.apply(surface.vertices), normals, surface.faces,
                        colors=albedo_at(colors, surface.vertices, device))
    else:
        uv_mesh = unwrap(surface.vertices, surface.faces)
        progress("unwrap")
        texture = bake_albedo(colors, surface.vertices, uv_mesh, cfg.texture_size, device)
        data = MeshData(placement.apply(surface.vertices[uv_mesh.source]), normals[uv_mesh.source], uv_mesh.faces,
                        uv=uv_mesh.uv, texture=to_uint8(texture))
    progress("color")

    c2w = camera.c2w[0].detach().cpu().double().numpy()
    fovy = float(camera.fovy[0])
    camera_json = camera_description(c2w, fovy, camera.width, camera.height, placement, CAMERA_NODE)
    if cfg.format == "glb":
        files = {f"{MESH_STEM}.glb": glb_bytes(data, CameraData(placement.camera_to_world(c2w), fovy,
                                                                camera.width / camera.height),
                                               MESH_NODE, CAMERA_NODE)}
    else:
        files = obj_files(data, MESH_STEM)
    for name, payload in files.items():
        atomic_write_bytes(out.file(name), payload)
    atomic_write_json(out.file(CAMERA_FILE), camera_json)
    progress("write")

    mesh_path = out.file(f"{MESH_STEM}.{cfg.format}")
    result = ExportResult(
        mesh_path=mesh_path,
        files=[out.file(name) for name in files] + [out.file(CAMERA_FILE), out.file(REPORT_FILE)],
        faces=int(len(data.faces)),
        vertices=int(len(data.vertices)),
        file_bytes=int(sum(len(payload) for payload in files.values())),
        threshold=float(surface.level),
        seconds=round(time.perf_counter() - started, 3),
        watertight=surface.watertight,
    )
    atomic_write_json(out.file(REPORT_FILE), {
        "mesh": mesh_path.name,
        "files": [p.name for p in result.files],
        "format": cfg.format,
        "faces": result.faces,
        "vertices": result.vertices,
        "file_bytes": result.file_bytes,
        "threshold": result.threshold,
        "seconds": result.seconds,
        "watertight": result.watertight,
        "faces_before_decimation": surface.faces_before_decimation,
        "components_removed": surface.components_removed,
        "touches_bound": surface.touches_bound,
        "object_size_m": float(np.ptp(data.vertices, axis=0).max()),
        "scale": placement.scale,
        "translation": placement.translation.tolist(),
        "timings": timings,
        "config": dataclasses.asdict(cfg),
    })
    return result


def _note_in_status(outdir: Path, result: ExportResult) -> None:
    """A finished reconstruction's status names its mesh: keep that true after a re-export."""
    path = Path(outdir) / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if status.get("state") == "done":
        status["mesh"] = result.mesh_path.name
        atomic_write_json(path, status)
