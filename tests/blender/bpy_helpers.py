"""Helpers for scripts that run inside Blender (the bpy module): enabling the add-on, a layout
that checks draw calls against Blender's UI API, silhouettes seen through a camera, reports."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import bpy

ROOT = Path(__file__).resolve().parents[2]
ADDON = "realfusion_blender"


def enable_addon():
    """Enable the add-on from the repository the way Blender enables an add-on (preferences included)."""
    import addon_utils

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    errors = []
    module = addon_utils.enable(ADDON, default_set=True, handle_error=errors.append)
    if errors:
        raise errors[0]
    assert module is not None, "the add-on did not load"
    return module


def disable_addon():
    import addon_utils

    errors = []
    addon_utils.disable(ADDON, default_set=True, handle_error=errors.append)
    if errors:
        raise errors[0]


def reset_scene():
    """An empty file, as after File > New (the add-on stays enabled)."""
    bpy.ops.wm.read_homefile(use_empty=True)


def scene_state(scene=None) -> dict:
    """What a user would call "the scene": objects, collections, camera, render size, datablocks."""
    scene = scene or bpy.context.scene
    return {
        "objects": sorted(ob.name for ob in bpy.data.objects),
        "collections": sorted(c.name for c in bpy.data.collections),
        "meshes": len(bpy.data.meshes),
        "cameras": len(bpy.data.cameras),
        "materials": len(bpy.data.materials),
        "camera": scene.camera.name if scene.camera else None,
        "resolution": (scene.render.resolution_x, scene.render.resolution_y),
    }


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def drive(context, key: str, timeout: float = 60.0, interval: float = 0.05) -> tuple[str, list]:
    """What the modal operator's TIMER does, in a loop: poll_job_once until the job ends.
    Returns (outcome, snapshots of the job after each tick)."""
    from realfusion_blender import previews
    from realfusion_blender.operators import find_job, poll_job_once

    deadline = time.monotonic() + timeout
    snapshots = []
    while time.monotonic() < deadline:
        outcome = poll_job_once(context, key)
        found = find_job(key)
        if found:
            job = found[1]
            snapshots.append({"state": job.state, "progress": job.progress, "stage": job.stage,
                              "preview": previews.size(key)[0] > 0, "eta": job.eta})
        if outcome is not None:
            return outcome, snapshots
        time.sleep(interval)
    raise AssertionError(f"job {key} did not end within {timeout}s: {snapshots[-3:]}")


# ---------------------------------------------------------------------------------------- silhouettes

def silhouette(scene, camera, objects, size: int = 64):
    """A size x size boolean mask of where `objects` are seen through `camera` (rays through pixel centers,
    cast against the evaluated meshes). Uses the camera exactly as Blender frames it (lens, sensor fit,
    shift, render aspect)."""
    import numpy as np
    from mathutils.bvhtree import BVHTree

    depsgraph = bpy.context.evaluated_depsgraph_get()
    trees = []
    for ob in objects:
        evaluated = ob.evaluated_get(depsgraph)
        mesh = evaluated.to_mesh()
        world = [evaluated.matrix_world @ v.co for v in mesh.vertices]
        trees.append(BVHTree.FromPolygons(world, [tuple(p.vertices) for p in mesh.polygons]))
        evaluated.to_mesh_clear()
    frame = camera.data.view_frame(scene=scene)  # top-right, bottom-right, bottom-left, top-left (camera space)
    top_right, bottom_right, bottom_left, top_left = frame
    origin = camera.matrix_world.translation
    rows = []
    for j in range(size):
        v = (j + 0.5) / size  # 0 at the top
        row = []
        for i in range(size):
            u = (i + 0.5) / size
            local = top_left.lerp(top_right, u).lerp(bottom_left.lerp(bottom_right, u), v)
            target = camera.matrix_world @ local
            direction = (target - origin).normalized()
            row.append(any(tree.ray_cast(origin, direction)[0] is not None for tree in trees))
        rows.append(row)
    return np.array(rows, dtype=bool)


def iou(a, b) -> float:
    import numpy as np

    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def image_alpha_mask(path: str, size: int = 64):
    """The alpha (or luminance, for RGB) of an image, resampled to size x size, as a boolean mask."""
    import numpy as np

    image = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = image.size
        pixels = np.array(image.pixels[:], dtype=np.float32).reshape(height, width, image.channels)
    finally:
        bpy.data.images.remove(image)
    pixels = pixels[::-1]  # Blender's rows start at the bottom
    values = pixels[..., 3] if pixels.shape[2] == 4 else pixels[..., :3].mean(axis=2)
    ys = ((np.arange(size) + 0.5) * height / size).astype(int)
    xs = ((np.arange(size) + 0.5) * width / size).astype(int)
    return values[np.ix_(ys, xs)] > 0.5


# ---------------------------------------------------------------------------------------- the UI

ICONS = set(bpy.types.UILayout.bl_rna.functions["label"].parameters["icon"].enum_items.keys())
SUBLAYOUTS = {"row", "column", "box", "split", "column_flow", "grid_flow", "menu_pie"}


class FakeOperatorProperties:
    def __init__(self, idname: str, log: list):
        category, _, name = idname.partition(".")
        operator = getattr(getattr(bpy.ops, category), name)
        rna = operator.get_rna_type()
        object.__setattr__(self, "_names", {p.identifier for p in rna.properties})
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_idname", idname)

    def __setattr__(self, name, value):
        if name not in self._names:
            raise AttributeError(f"operator {self._idname} has no property {name!r}")
        self._log.append(("operator_property", self._idname, name, value))


class FakeLayout:
    """Stands in for bpy.types.UILayout in draw functions: every call is checked against UILayout's RNA
    (function exists, keywords exist, icons exist, properties and operators exist) and recorded."""

    def __init__(self, log: list | None = None):
        object.__setattr__(self, "log", [] if log is None else log)

    def __setattr__(self, name, value):
        if name not in bpy.types.UILayout.bl_rna.properties:
            raise AttributeError(f"UILayout has no attribute {name!r}")
        self.log.append(("set", name, value))

    def __getattr__(self, name):
        function = bpy.types.UILayout.bl_rna.functions.get(name)
        if function is None:
            raise AttributeError(f"UILayout has no function {name!r}")
        parameters = [p.identifier for p in function.parameters if not p.is_output]

        def call(*args, **kwargs):
            if len(args) > len(parameters):
                raise TypeError(f"UILayout.{name}: {len(args)} positional arguments")
            unknown = set(kwargs) - set(parameters)
            if unknown:
                raise TypeError(f"UILayout.{name}: unknown keywords {sorted(unknown)}")
            bound = dict(zip(parameters, args), **kwargs)
            icon = bound.get("icon")
            if isinstance(icon, str) and icon not in ICONS:
                raise ValueError(f"UILayout.{name}: unknown icon {icon!r}")
            if name in ("prop", "prop_search", "template_ID", "template_ID_preview", "props_enum", "prop_enum"):
                data, prop = bound.get("data"), bound.get("property")
                if prop not in data.bl_rna.properties:
                    raise AttributeError(f"UILayout.{name}: {type(data).__name__} has no property {prop!r}")
            if name == "template_list":
                if not hasattr(bpy.types, bound["listtype_name"]):
                    raise AttributeError(f"no UIList {bound['listtype_name']!r} registered")
                for data_key, prop_key in (("dataptr", "propname"), ("active_dataptr", "active_propname")):
                    if bound[prop_key] not in bound[data_key].bl_rna.properties:
                        raise AttributeError(f"template_list: no property {bound[prop_key]!r}")
            if name == "progress":
                factor = bound.get("factor", 0.0)
                if not 0.0 <= factor <= 1.0:
                    raise ValueError(f"progress factor {factor} outside 0..1")
            self.log.append((name, bound))
            if name in SUBLAYOUTS:
                return FakeLayout(self.log)
            if name == "operator":
                return FakeOperatorProperties(bound["operator"], self.log)
            if name == "icon":
                return 1
            return None

        return call

    # what the log says
    def calls(self, name: str) -> list[dict]:
        return [entry[1] for entry in self.log if entry[0] == name]

    def texts(self) -> str:
        return "\n".join(str(call.get("text", "")) for entry in self.log if entry[0] not in ("set",)
                         for call in [entry[1]] if isinstance(call, dict))

    def flowing_text(self) -> str:
        """texts() with wrapped lines joined again, for phrases that a wrap may split."""
        return " ".join(self.texts().split())

    def operators(self) -> list[str]:
        return [call["operator"] for call in self.calls("operator")]


class FakeContext:
    def __init__(self, **extra):
        self.scene = bpy.context.scene
        self.preferences = bpy.context.preferences
        self.window_manager = bpy.context.window_manager
        self.region = None
        self.space_data = None
        for key, value in extra.items():
            setattr(self, key, value)


def draw_panel(panel_class, context=None) -> FakeLayout:
    layout = FakeLayout()

    class Self:
        pass

    this = Self()
    this.layout = layout
    context = context or FakeContext()
    if hasattr(panel_class, "poll"):
        assert panel_class.poll(context)
    if hasattr(panel_class, "editor_image"):
        this.editor_image = lambda ctx: panel_class.editor_image(this, ctx)
    panel_class.draw(this, context)
    return layout


# ---------------------------------------------------------------------------------------- running checks

def run_checks(namespace: dict, report_path: str, only: list[str]) -> int:
    """Run every `check_*` function of `namespace` (or those named), each after a File > New; write
    {name: {"ok", "error", "seconds"}} to report_path."""
    names = [n for n in namespace if n.startswith("check_") and callable(namespace[n])]
    if only:
        names = [n for n in names if n in only]
    results = {}
    for name in names:
        start = time.monotonic()
        try:
            reset_scene()
            namespace[name]()
            results[name] = {"ok": True, "error": "", "seconds": round(time.monotonic() - start, 2)}
        except BaseException:  # noqa: BLE001 - report everything, including assertion errors
            results[name] = {"ok": False, "error": traceback.format_exc(),
                             "seconds": round(time.monotonic() - start, 2)}
        print(f"{'ok  ' if results[name]['ok'] else 'FAIL'} {name} ({results[name]['seconds']}s)", flush=True)
    Path(report_path).write_text(json.dumps(results, indent=2))
    return 0
