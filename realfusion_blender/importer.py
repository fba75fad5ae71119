# SPDX-License-Identifier: GPL-3.0-or-later
"""Bringing a finished job into the scene: the textured GLB, tidied, and a camera where the photo was taken.

Everything here runs on the main thread inside one operator (`realfusion.import_result`,
which has the UNDO flag), so one undo step removes all of it: the collection, the mesh,
the camera, the scene's camera and render size, and the objects hidden for the view.

The engine reconstructs from a re-framed copy of the photo (reference.png: the object
centered on a square, scaled to a fixed share of it). It records which square of the
photo that is (`realfusion:framing` in reference.png); from it the camera is widened and
shifted to frame the whole photo, so the user's own photo is its background and lines up.

The mesh lands at the origin, where most scenes (Blender's startup file: the Cube) already
have something; whatever stands between the new camera and the mesh is hidden (viewport and
render) and named in the panel, so the first look through the camera shows the result.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import bpy
from mathutils import Euler, Matrix, Quaternion, Vector

# OpenCV-style cameras (x right, y down, looking down +z) to Blender's (x right, y up, looking down -z).
CV_TO_BLENDER = Matrix(((1, 0, 0, 0), (0, -1, 0, 0), (0, 0, -1, 0), (0, 0, 0, 1)))
MIN_RENDER_LONG_SIDE = 1024


class ImportProblem(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} {fix}")
        self.problem = problem
        self.fix = fix


@dataclass
class CameraSpec:
    matrix_world: Matrix
    lens: float = 50.0
    sensor_width: float = 36.0
    sensor_height: float | None = None
    sensor_fit: str = 'AUTO'
    width: int = 0
    height: int = 0
    clip_start: float | None = None
    clip_end: float | None = None
    shift_x: float = 0.0
    shift_y: float = 0.0


def _first(data: dict, *names, default=None):
    for name in names:
        if name in data and data[name] is not None:
            return data[name]
    return default


def _matrix(value) -> Matrix | None:
    """4x4, 3x4 or 3x3 nested lists, or 16 / 9 numbers (row-major)."""
    try:
        rows = [list(map(float, row)) for row in value]
    except TypeError:
        flat = [float(v) for v in value]
        size = 4 if len(flat) == 16 else 3 if len(flat) == 9 else 0
        if not size:
            return None
        rows = [flat[i * size:(i + 1) * size] for i in range(size)]
    if len(rows) == 3 and all(len(r) == 4 for r in rows):
        rows.append([0.0, 0.0, 0.0, 1.0])
    if len(rows) in (3, 4) and all(len(r) == len(rows) for r in rows):
        return Matrix(rows).to_4x4()
    return None


def parse_camera(data: dict) -> CameraSpec:
    """camera.json -> CameraSpec. Read defensively: several spellings of each field are accepted."""
    if not isinstance(data, dict):
        raise ImportProblem("camera.json is not a JSON object.", "Export the job again with `realfusion export`.")
    data = data.get("camera", data) if isinstance(data.get("camera"), dict) else data

    world = None
    for name in ("matrix_world", "world_matrix", "transform", "matrix", "camera_to_world", "c2w"):
        if name in data:
            world = _matrix(data[name])
            break
    rotation = _first(data, "rotation", "rotation_matrix")
    if world is None and rotation is not None:
        world = _matrix(rotation)  # a 3x3 rotation, or a 4x4 world matrix that may carry the translation
        if world is None and len(rotation) == 4:
            world = Quaternion(rotation).to_matrix().to_4x4()  # w, x, y, z
        elif world is None and len(rotation) == 3:
            world = Euler(rotation, 'XYZ').to_matrix().to_4x4()
    if world is None and "rotation_quaternion" in data:
        world = Quaternion(data["rotation_quaternion"]).to_matrix().to_4x4()
    if world is None and "rotation_euler" in data:
        world = Euler(data["rotation_euler"], 'XYZ').to_matrix().to_4x4()
    if world is None:
        raise ImportProblem("camera.json has no camera orientation (matrix_world or rotation).",
                            "Export the job again with a current engine (`realfusion export`).")
    location = _first(data, "location", "position", "translation")
    if location is not None:
        world.translation = Vector(tuple(map(float, location)))
    elif world.translation.length == 0.0:
        raise ImportProblem("camera.json has no camera position.",
                            "Export the job again with a current engine (`realfusion export`).")
    if str(_first(data, "convention", "axes", default="blender")).lower() in ("opencv", "cv", "colmap"):
        world = world @ CV_TO_BLENDER

    size = _first(data, "resolution", "image_size", "size")
    image = data.get("image") if isinstance(data.get("image"), dict) else {}
    width = _first(data, "image_width", "width", default=_first(image, "width", default=0))
    height = _first(data, "image_height", "height", default=_first(image, "height", default=0))
    if size is not None and not width:
        width, height = size[0], size[1]
    width, height = int(width or 0), int(height or 0)

    sensor_width = float(_first(data, "sensor_width", "sensor_width_mm", "sensor", default=36.0))
    sensor_height = _first(data, "sensor_height", "sensor_height_mm")
    fit = str(_first(data, "sensor_fit", default="")).upper()
    lens = _first(data, "lens", "lens_mm", "focal_length_mm", "focal_length")
    if lens is None:
        fovy = _first(data, "fovy_deg", "fov_y_deg", "yfov_deg")
        fovy = math.radians(float(fovy)) if fovy is not None else None
        if fovy is None and _first(data, "yfov", "fovy", "fov") is not None:  # radians if small, else degrees
            value = float(_first(data, "yfov", "fovy", "fov"))
            fovy = value if value < math.pi else math.radians(value)
        fovx = _first(data, "fovx_deg", "fov_x_deg", "xfov_deg")
        if fovy is not None:
            sensor_height = float(sensor_height or sensor_width * (height / width if width and height else 1.0))
            lens = sensor_height / (2.0 * math.tan(fovy / 2.0))
            fit = fit or 'VERTICAL'
        elif fovx is not None:
            lens = sensor_width / (2.0 * math.tan(math.radians(float(fovx)) / 2.0))
            fit = fit or 'HORIZONTAL'
        else:
            raise ImportProblem("camera.json has no focal length (lens in mm, or a field of view).",
                                "Export the job again with a current engine (`realfusion export`).")
    fit = fit if fit in ('AUTO', 'HORIZONTAL', 'VERTICAL') else 'HORIZONTAL'
    return CameraSpec(matrix_world=world, lens=float(lens), sensor_width=sensor_width,
                      sensor_height=float(sensor_height) if sensor_height is not None else None,
                      sensor_fit=fit, width=width, height=height,
                      clip_start=_first(data, "clip_start", "znear", "near"),
                      clip_end=_first(data, "clip_end", "zfar", "far"),
                      shift_x=float(_first(data, "shift_x", default=0.0)),
                      shift_y=float(_first(data, "shift_y", default=0.0)))


def read_camera(path: str) -> CameraSpec:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ImportProblem(f"Cannot read the camera file {path} ({exc}).",
                            "Fetch the result again; the engine keeps it in the job's folder.") from exc
    return parse_camera(data)


def render_size(width: int, height: int, min_long_side: int = MIN_RENDER_LONG_SIDE) -> tuple[int, int]:
    """The image's size, scaled up (aspect kept) when it is smaller than a useful render."""
    if width <= 0 or height <= 0:
        return 0, 0
    scale = max(1.0, min_long_side / max(width, height))
    return round(width * scale), round(height * scale)


def setup_camera(scene, collection, spec: CameraSpec, name: str, background=None):
    """A new camera object placed as `spec` says, made the scene's camera, with the render size set."""
    data = bpy.data.cameras.new(name)
    data.lens = spec.lens
    data.sensor_width = spec.sensor_width
    if spec.sensor_height:
        data.sensor_height = spec.sensor_height
    data.sensor_fit = spec.sensor_fit
    data.shift_x, data.shift_y = spec.shift_x, spec.shift_y
    if spec.clip_start:
        data.clip_start = float(spec.clip_start)
    if spec.clip_end:
        data.clip_end = float(spec.clip_end)
    camera = bpy.data.objects.new(name, data)
    collection.objects.link(camera)
    camera.matrix_world = spec.matrix_world
    scene.camera = camera
    width, height = render_size(spec.width, spec.height)
    if width:
        scene.render.resolution_x, scene.render.resolution_y = width, height
        scene.render.resolution_percentage = 100
        scene.render.pixel_aspect_x = scene.render.pixel_aspect_y = 1.0
    if background is not None:
        data.show_background_images = True
        slot = data.background_images.new()
        slot.image = background
        slot.display_depth = 'BACK'
        slot.frame_method = 'FIT'
        slot.alpha = 1.0
    return camera


# ---------------------------------------------------------------------------------------- the photo's framing

def png_text(path: str) -> dict[str, str]:
    """The tEXt chunks of a PNG file (standard library only; Blender's images do not expose them)."""
    import struct
    import zlib

    texts = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return texts
            while True:
                head = f.read(8)
                if len(head) < 8:
                    break
                length, kind = struct.unpack(">I4s", head)
                data = f.read(length)
                f.read(4)  # crc
                if kind == b"tEXt" and b"\0" in data:
                    key, value = data.split(b"\0", 1)
                    texts[key.decode("latin-1")] = value.decode("latin-1")
                elif kind == b"zTXt" and b"\0" in data:
                    key, value = data.split(b"\0", 1)
                    texts[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
                elif kind in (b"IDAT", b"IEND"):  # text chunks come before the pixels here
                    break
    except OSError:
        pass
    return texts


def photo_framing(reference_path: str) -> dict | None:
    """{"box": [x0, y0, x1, y1], "size": [W, H]}: the square of the photo (pixels, y down) that the engine's
    reference view shows; None when the engine did not record it."""
    text = png_text(reference_path).get("realfusion:framing") if reference_path else None
    try:
        framing = json.loads(text) if text else None
        box, size = [float(v) for v in framing["box"]], [int(v) for v in framing["size"]]
    except (ValueError, TypeError, KeyError):
        return None
    if len(box) != 4 or len(size) != 2 or box[2] <= box[0] or min(size) <= 0:
        return None
    return {"box": box, "size": size}


def photo_view(spec: CameraSpec, framing: dict) -> CameraSpec:
    """The reference camera widened and shifted to frame the whole photo instead of the engine's square.

    The reference view is the square `box` of the photo; the photo is W x H of those pixels. Same lens and
    pose, a sensor as many times larger as the photo is than the box, and a shift that moves the frame's
    center from the box's center to the photo's (shift is in units of the frame's larger side)."""
    x0, y0, x1, _ = framing["box"]
    width, height = framing["size"]
    side = x1 - x0
    square = spec.sensor_height if spec.sensor_fit == 'VERTICAL' and spec.sensor_height else spec.sensor_width
    longest = max(width, height)
    offset_x = width / 2 - (x0 + side / 2)  # photo center - box center, photo pixels, y down
    offset_y = height / 2 - (y0 + side / 2)
    return CameraSpec(matrix_world=spec.matrix_world, lens=spec.lens, sensor_width=square * longest / side,
                      sensor_height=None, sensor_fit='AUTO', width=width, height=height,
                      clip_start=spec.clip_start, clip_end=spec.clip_end,
                      shift_x=(offset_x + spec.shift_x * side) / longest,
                      shift_y=(-offset_y + spec.shift_y * side) / longest)


# ---------------------------------------------------------------------------------------- a clear view

def find_occluders(scene, camera, meshes, samples: int = 16) -> list:
    """Other visible objects that stand between the camera and the mesh on some ray of a samples x samples
    grid through the frame (Scene.ray_cast sets up its search anew each call: a coarse grid keeps a heavy
    scene's import quick; an object small enough to slip between its rays hides little of the mesh)."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    ours = {ob.name for ob in meshes}
    frame = camera.data.view_frame(scene=scene)
    top_right, bottom_right, bottom_left, top_left = frame
    origin = camera.matrix_world.translation.copy()
    found = {}
    for j in range(samples):
        v = (j + 0.5) / samples
        for i in range(samples):
            u = (i + 0.5) / samples
            local = top_left.lerp(top_right, u).lerp(bottom_left.lerp(bottom_right, u), v)
            direction = (camera.matrix_world @ local - origin).normalized()
            start, in_front = origin.copy(), []
            for _ in range(16):  # walk along the ray through every surface until ours (or nothing)
                hit, location, _normal, _index, ob, _matrix = scene.ray_cast(depsgraph, start, direction)
                if not hit:
                    in_front = []
                    break
                original = ob.original if hasattr(ob, "original") else ob
                if original.name in ours:
                    break
                in_front.append(original)
                start = location + direction * 1e-4
            for ob in in_front:
                found[ob.name] = ob
    for ob in scene.objects:  # a closed object around the camera (the default Cube, for a small result) walls it in
        if ob.type == "MESH" and ob.name not in ours and ob.visible_get() and _contains(ob, origin):
            found[ob.name] = ob
    return list(found.values())


def _contains(ob, point) -> bool:
    """Whether `point` (world) lies inside `ob`'s bounding box."""
    local = ob.matrix_world.inverted() @ point
    corners = [c[:] for c in ob.bound_box]
    return all(min(c[k] for c in corners) <= local[k] <= max(c[k] for c in corners) for k in range(3))


def hide_occluders(scene, camera, meshes) -> list[str]:
    """Hide (viewport and render) what stands in front of the mesh; the names, for the panel."""
    hidden = []
    for ob in find_occluders(scene, camera, meshes):
        ob.hide_set(True)
        ob.hide_render = True
        hidden.append(ob.name)
    return sorted(hidden)


def load_image(path: str, name: str | None = None):
    image = bpy.data.images.load(path, check_existing=True)
    if name:
        image.name = name
    return image


def import_result(context, glb_path: str, camera_path: str = "", *, name: str = "RealFusion",
                  background=None, framing: dict | None = None, clear_view: bool = True) -> dict:
    """Import the GLB into a new collection named `name`, tidy it, select it and add the camera.

    background: an Image for the camera's background (the photo, or the reference view), or None.
    framing: where the reference view lies in the photo (photo_framing); given, the camera frames the
    whole photo (photo_view), else the engine's square reference view.
    clear_view: hide the objects that stand between the new camera and the mesh.
    Returns {"collection", "meshes", "camera", "hidden"}. Raises ImportProblem and leaves the scene as it was.
    """
    if not glb_path or not os.path.isfile(glb_path):
        raise ImportProblem(f"The mesh {glb_path or 'mesh.glb'} is missing.",
                            "Fetch the result again (the engine keeps it in the job's folder).")
    spec = read_camera(camera_path) if camera_path and os.path.isfile(camera_path) else None

    scene = context.scene
    view_layer = context.view_layer
    before = set(bpy.data.objects)
    try:
        result = bpy.ops.import_scene.gltf(filepath=glb_path)
    except AttributeError as exc:  # the glTF add-on is disabled
        raise ImportProblem(f"Blender's glTF importer is not available ({exc}).",
                            "Enable the add-on \"glTF 2.0 format\" in Preferences > Add-ons.") from exc
    except Exception as exc:  # noqa: BLE001 - the importer's own bugs (e.g. with a newer numpy) surface here
        result = {'CANCELLED'}
        cause = _last_line(exc)
        print(f"RealFusion: glTF import of {glb_path} failed: {exc}")
    else:
        cause = ""
    new_objects = [ob for ob in bpy.data.objects if ob not in before]
    if 'FINISHED' not in result or not any(ob.type == 'MESH' for ob in new_objects):
        _remove_objects(new_objects)
        if cause:
            raise ImportProblem(f"Blender's glTF importer could not read {os.path.basename(glb_path)}: {cause}",
                                "If that names Blender's own code (its glTF add-on), update Blender and press "
                                "Import again; if the file is damaged, press Fetch Result to download it again.")
        raise ImportProblem(f"Blender's glTF importer could not read a mesh from {glb_path}.",
                            "Fetch the result again (or export it again with `realfusion export`); the engine's "
                            "log says more if it keeps happening.")

    collection = bpy.data.collections.new(name)
    scene.collection.children.link(collection)
    for ob in new_objects:
        for owner in list(ob.users_collection):
            owner.objects.unlink(ob)
        collection.objects.link(ob)

    # Tidy: no empties (their children keep their world placement), no camera from the GLB
    # when camera.json gives ours.
    glb_cameras = [ob for ob in new_objects if ob.type == 'CAMERA']
    for ob in [ob for ob in new_objects if ob.type == 'EMPTY']:
        for child in ob.children:
            world = child.matrix_world.copy()
            child.parent = ob.parent
            child.matrix_world = world
        new_objects.remove(ob)
        bpy.data.objects.remove(ob)
    view_layer.update()

    meshes = [ob for ob in new_objects if ob.type == 'MESH']
    meshes.sort(key=lambda ob: len(ob.data.polygons), reverse=True)
    meshes[0].name = name
    for ob in view_layer.objects:
        ob.select_set(False)
    for ob in meshes:
        ob.select_set(True)
    view_layer.objects.active = meshes[0]

    camera = None
    if spec is not None:
        _remove_objects(glb_cameras)
        if framing is not None:
            spec = photo_view(spec, framing)
        camera = setup_camera(scene, collection, spec, f"{name} Camera", background)
    elif glb_cameras:  # no camera.json: the GLB's own camera is the reference view
        camera = glb_cameras[0]
        camera.name = f"{name} Camera"
        scene.camera = camera
    hidden = []
    if camera is not None and clear_view:
        view_layer.update()
        hidden = hide_occluders(scene, camera, meshes)
    frame_selected(context)
    return {"collection": collection, "meshes": meshes, "camera": camera, "hidden": hidden}


def _last_line(exc: BaseException) -> str:
    """The innermost cause of an error, one line: Blender's operator errors carry a whole Python traceback
    ("Error: Python: Traceback ...", then "AttributeError: ...", then "Location: ..."); its last
    "SomethingError: ..." line says what went wrong."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    if causes:
        return causes[-1]
    lines = [line for line in lines if not line.startswith("Location:")]
    return lines[-1] if lines else type(exc).__name__


def _remove_objects(objects) -> None:
    for ob in objects:
        data = ob.data
        bpy.data.objects.remove(ob)
        if isinstance(data, bpy.types.Mesh) and data.users == 0:
            bpy.data.meshes.remove(data)
        elif isinstance(data, bpy.types.Camera) and data.users == 0:
            bpy.data.cameras.remove(data)


def frame_selected(context) -> None:
    """View Selected in every 3D view of the window (nothing to frame in background mode)."""
    if bpy.app.background or context.window is None or context.screen is None:
        return
    for area in context.screen.areas:
        if area.type != 'VIEW_3D':
            continue
        region = next((r for r in area.regions if r.type == 'WINDOW'), None)
        if region is None:
            continue
        with context.temp_override(area=area, region=region):
            bpy.ops.view3d.view_selected(use_all_regions=False)
