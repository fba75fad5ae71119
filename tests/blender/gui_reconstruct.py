"""The add-on in a real Blender window (Xvfb), from Reconstruct to the imported mesh, then one Ctrl+Z.

    xvfb-run -a blender --factory-startup --enable-event-simulate --python gui_reconstruct.py -- \
        ENGINE_URL PHOTO.png REPORT.json OVERRIDES.json ENGINE_DATA_DIR SHOTS_DIR

Blender's default startup scene (Cube, Light, Camera), the add-on enabled from the repository,
its sidebar tab opened with Ctrl+wheel as a user would. Then, on Blender's own timers:
the real Reconstruct operator, invoked in the 3D view, runs modal on its event timer
against the real engine (previews on) until it imports the result; the scene is rendered
through the new camera (Workbench, object colors: is the mesh where the photo's object is,
and is anything in front of it?); Ctrl+Z is pressed once (simulated key events); a wrong
token shows its message. Screenshots of the sidebar at idle, running with a preview, done,
and the error go to SHOTS_DIR. The report is written last: a crash leaves none.

The only things done for the test's sake: the tiny engine's config overrides are added to the
ones the panel sends (its fields cannot express them), and Debian's Blender 3.4 glTF
importer is given `numpy.bool`, which numpy 1.24 removed (a bug of that Blender, not of the
add-on, which does not touch numpy), after checking that the panel names that cause when the
automatic import fails on it; the panel's Import then brings the result in.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import bpy

ROOT = Path(__file__).resolve().parents[2]
ADDON = "realfusion_blender"
ARGS = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
URL, PHOTO, REPORT, OVERRIDES, DATA_DIR, SHOTS = ARGS[:6] if len(ARGS) >= 6 else [""] * 6
TIMEOUT_S = 200.0
REPORT_DATA: dict = {"steps": []}


def shim_numpy_for_blender_34_gltf():
    import numpy as np

    if "bool" not in np.__dict__:
        np.bool = bool  # noqa: NPY001 - Blender 3.4's io_import_scene_gltf2 uses np.bool


def step(name: str) -> None:
    REPORT_DATA["steps"].append([name, round(time.monotonic() - START, 1)])
    print(f"gui: {name}", flush=True)


def view3d():
    window = bpy.context.window_manager.windows[0]
    area = max((a for a in window.screen.areas if a.type == 'VIEW_3D'), key=lambda a: a.width * a.height)
    regions = {r.type: r for r in area.regions}
    return window, area, regions["WINDOW"], regions["UI"]


def redraw():
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            area.tag_redraw()


def prefs():
    return bpy.context.preferences.addons[ADDON].preferences


def settings():
    return bpy.context.scene.realfusion


def settle():
    """Mouse over the empty viewport (a report's popup under the cursor goes away), then a moment to draw."""
    window, _area, main, _sidebar = view3d()
    for dx in (0, 40, 80):
        window.event_simulate(type='MOUSEMOVE', value='NOTHING', x=main.x + 80 + dx, y=main.y + 80)
    redraw()


def screenshot(name: str) -> str:
    """The sidebar of the 3D view, cut from a screenshot of the window (bpy.ops.screen.screenshot)."""
    import numpy as np

    window, area, _main, sidebar = view3d()
    full = os.path.join(SHOTS, f"_{name}_full.png")
    with bpy.context.temp_override(window=window, area=area):
        bpy.ops.wm.redraw_timer(type='DRAW_WIN_SWAP', iterations=1)  # what the window shows now
    with bpy.context.temp_override(window=window, area=area):
        bpy.ops.screen.screenshot(filepath=full)
    image = bpy.data.images.load(full, check_existing=False)
    width, height = image.size
    pixels = np.array(image.pixels[:], dtype=np.float32).reshape(height, width, image.channels)
    bpy.data.images.remove(image)
    os.unlink(full)
    # regions are in window pixels from the bottom left, as Blender's images are
    x0, y0 = sidebar.x - window.x, sidebar.y - window.y
    crop = pixels[y0:y0 + sidebar.height, x0:x0 + sidebar.width]
    out = bpy.data.images.new(f"shot {name}", crop.shape[1], crop.shape[0], alpha=True)
    out.pixels[:] = crop.ravel()
    out.filepath_raw = os.path.join(SHOTS, f"{name}.png")
    out.file_format = 'PNG'
    out.save()
    bpy.data.images.remove(out)
    REPORT_DATA.setdefault("screenshots", {})[name] = [int(crop.shape[1]), int(crop.shape[0])]
    return os.path.join(SHOTS, f"{name}.png")


def our_panel_drawn() -> bool:
    return DRAWN.get("main", 0) > 0


DRAWN: dict = {}


def watch_panel_draws():
    from realfusion_blender import panels

    original = panels.VIEW3D_PT_realfusion.draw

    def draw(self, context):
        DRAWN["main"] = DRAWN.get("main", 0) + 1
        return original(self, context)

    panels.VIEW3D_PT_realfusion.draw = draw


def render_masks(scene, meshes, size: int):
    """Render through the scene's camera (Workbench, flat object colors, transparent film); masks of where
    the result's meshes are seen and where any other object is."""
    import numpy as np

    saved = {"engine": scene.render.engine, "film": scene.render.film_transparent,
             "percentage": scene.render.resolution_percentage, "light": scene.display.shading.light,
             "color_type": scene.display.shading.color_type, "colors": {ob.name: tuple(ob.color)
                                                                        for ob in scene.objects},
             "path": scene.render.filepath}
    ours = {ob.name for ob in meshes}
    try:
        scene.render.engine = 'BLENDER_WORKBENCH'
        scene.render.film_transparent = True
        scene.render.resolution_percentage = max(1, round(100 * size / max(scene.render.resolution_x,
                                                                           scene.render.resolution_y)))
        scene.display.shading.light = 'FLAT'
        scene.display.shading.color_type = 'OBJECT'
        for ob in scene.objects:
            ob.color = (1, 0, 0, 1) if ob.name in ours else (0, 1, 0, 1)
        scene.render.filepath = os.path.join(SHOTS, "_render.png")
        bpy.ops.render.render(write_still=True)
        image = bpy.data.images.load(scene.render.filepath, check_existing=False)
        width, height = image.size
        pixels = np.array(image.pixels[:], dtype=np.float32).reshape(height, width, image.channels)[::-1]
        bpy.data.images.remove(image)
        os.unlink(scene.render.filepath)
    finally:
        scene.render.engine, scene.render.film_transparent = saved["engine"], saved["film"]
        scene.render.resolution_percentage = saved["percentage"]
        scene.display.shading.light, scene.display.shading.color_type = saved["light"], saved["color_type"]
        for ob in scene.objects:
            ob.color = saved["colors"].get(ob.name, ob.color)
        scene.render.filepath = saved["path"]
    seen = pixels[..., 3] > 0.5
    mesh = seen & (pixels[..., 0] > 0.5) & (pixels[..., 1] < 0.5)
    other = seen & (pixels[..., 1] > 0.5) & (pixels[..., 0] < 0.5)
    return mesh, other


def photo_mask(path: str, width: int, height: int):
    import numpy as np

    image = bpy.data.images.load(path, check_existing=False)
    w, h = image.size
    pixels = np.array(image.pixels[:], dtype=np.float32).reshape(h, w, image.channels)[::-1]
    bpy.data.images.remove(image)
    ys = ((np.arange(height) + 0.5) * h / height).astype(int)
    xs = ((np.arange(width) + 0.5) * w / width).astype(int)
    return pixels[np.ix_(ys, xs)][..., 3] > 0.5


def press(window, x: int, y: int, key: str, ctrl: bool = False):
    window.event_simulate(type='MOUSEMOVE', value='NOTHING', x=x, y=y)
    window.event_simulate(type=key, value='PRESS', ctrl=ctrl, x=x, y=y)
    window.event_simulate(type=key, value='RELEASE', ctrl=ctrl, x=x, y=y)


def scenario():
    """The test, as a generator: each `yield` lets Blender run (draw, timers, modal events) for a moment."""
    import numpy as np

    import numpy

    gltf_needs_shim = "bool" not in numpy.__dict__  # Debian's Blender 3.4 with numpy >= 1.24
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import addon_utils

    addon_utils.enable(ADDON, default_set=True)
    from realfusion_blender import operators, previews

    watch_panel_draws()
    with open(OVERRIDES) as f:
        tiny = json.load(f)
    panel_overrides = operators.advanced_overrides
    operators.advanced_overrides = lambda s: panel_overrides(s) + tiny  # the tiny engine's config
    p = prefs()
    p.server_url, p.engine_jobs_dir, p.poll_interval = URL, DATA_DIR, 200
    REPORT_DATA["startup_objects"] = sorted(ob.name for ob in bpy.context.scene.objects)

    # the sidebar, on our tab: open it, then click down its strip of tabs (right edge) until ours is drawn
    window, area, main, sidebar = view3d()
    area.spaces.active.show_region_ui = True
    yield 0.5
    window, area, main, sidebar = view3d()
    x = sidebar.x + sidebar.width - 10
    for y in range(sidebar.y + sidebar.height - 15, sidebar.y + sidebar.height // 3, -18):
        if our_panel_drawn():
            break
        window.event_simulate(type='MOUSEMOVE', value='NOTHING', x=x, y=y)
        window.event_simulate(type='LEFTMOUSE', value='PRESS', x=x, y=y)
        window.event_simulate(type='LEFTMOUSE', value='RELEASE', x=x, y=y)
        DRAWN.clear()
        redraw()
        yield 0.25
    assert our_panel_drawn(), "the RealFusion tab did not open"
    step("sidebar open")

    scene = bpy.context.scene
    s = settings()
    s.image = bpy.data.images.load(PHOTO)
    s.initializer = "disc"
    bpy.ops.ed.undo_push(message="Pick the photo")  # what the panel's buttons do; a script's changes push none
    settle()
    yield 0.5
    screenshot("panel_idle")
    step("idle screenshot")
    s.preset = "fast"

    # Reconstruct: the real operator, invoked in the 3D view; its modal runs on its own event timer
    window, area, main, sidebar = view3d()
    with bpy.context.temp_override(window=window, area=area, region=sidebar):
        result = bpy.ops.realfusion.reconstruct('INVOKE_DEFAULT')
    assert result == {'RUNNING_MODAL'}, result
    key = s.jobs[-1].key
    step("reconstruct invoked")
    seen, previews_seen, shot_running = [], set(), False
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = s.job(key)
        icon = previews.icon_id(key)
        seen.append((job.state, job.stage, round(job.progress, 3), job.message))
        if icon:
            previews_seen.add(icon)
        if job.state == "running" and icon and not shot_running and len(previews_seen) >= 2:
            settle()
            yield 0.3
            screenshot("panel_running")
            shot_running = True
            step("running screenshot")
        if job.imported or job.state in ("failed", "cancelled", "interrupted") or job.error_problem:
            break
        yield 0.2
    # previews swapped fast while the panel draws them (the old Image-based previews crashed here)
    for _ in range(20):
        previews.show(key, os.path.join(bpy.path.abspath(s.job(key).folder), "preview.png"))
        redraw()
        yield 0.05
    job = s.job(key)
    if gltf_needs_shim and not job.imported:
        # Blender 3.4's glTF importer fails on this numpy: the panel must say why, then Import works
        REPORT_DATA["gltf_failure"] = [job.state, job.error_kind, job.error_problem, job.error_fix]
        step(f"import failed as expected: {job.error_problem}")
        shim_numpy_for_blender_34_gltf()
        window, area, main, sidebar = view3d()
        with bpy.context.temp_override(window=window, area=area, region=sidebar):
            bpy.ops.realfusion.import_result('INVOKE_DEFAULT', True, key=key)  # the panel's Import, one undo step
        yield 0.3
    job = s.job(key)
    REPORT_DATA["states"] = [x[0] for x in seen]
    REPORT_DATA["stages"] = sorted({x[1] for x in seen if x[1]})
    REPORT_DATA["messages"] = sorted({x[3] for x in seen if x[3]})
    REPORT_DATA["progress"] = [x[2] for x in seen]
    REPORT_DATA["previews"] = len(previews_seen)
    REPORT_DATA["job"] = {"state": job.state, "imported": job.imported, "error": [job.error_problem, job.error_fix],
                          "collection": job.collection_name, "camera": job.camera_name, "hidden": job.hidden,
                          "job_id": job.job_id, "folder": job.folder}
    step(f"job ended: {job.state}, imported={job.imported}")
    if not job.imported:
        return
    yield 0.5
    settle()
    yield 1.0
    screenshot("panel_done")

    # the default scene, seen through the new camera
    collection = bpy.data.collections[job.collection_name]
    meshes = [ob for ob in collection.objects if ob.type == 'MESH']
    camera = scene.camera
    background = camera.data.background_images[0].image if camera.data.background_images else None
    REPORT_DATA["camera"] = {"name": camera.name, "background": background.name if background else None,
                             "background_is_photo": background == s.image,
                             "resolution": [scene.render.resolution_x, scene.render.resolution_y],
                             "shift": [camera.data.shift_x, camera.data.shift_y]}
    REPORT_DATA["visible_objects"] = sorted(ob.name for ob in scene.objects if ob.visible_get())
    mesh_mask, other_mask = render_masks(scene, meshes, size=96)
    mask = photo_mask(PHOTO, mesh_mask.shape[1], mesh_mask.shape[0])
    union = (mesh_mask | mask).sum()
    REPORT_DATA["render"] = {"size": list(mesh_mask.shape), "iou": float((mesh_mask & mask).sum() / union),
                             "mask_pixels": int(mask.sum()), "mesh_pixels": int(mesh_mask.sum()),
                             "other_in_mask": int((other_mask & mask).sum()),
                             "other_pixels": int(other_mask.sum())}
    step(f"render checked: {REPORT_DATA['render']}")

    # one Ctrl+Z, as keys pressed over the 3D view
    window, area, main, sidebar = view3d()
    before = sorted(j.key for j in s.jobs)
    press(window, main.x + main.width // 2, main.y + main.height // 2, 'Z', ctrl=True)
    yield 1.0
    s = settings()
    scene = bpy.context.scene
    job = s.job(key)
    REPORT_DATA["after_undo"] = {
        "jobs": sorted(j.key for j in s.jobs), "jobs_before": before,
        "job": None if job is None else {"state": job.state, "imported": job.imported, "job_id": job.job_id,
                                         "glb": bool(job.glb_path)},
        "collections": sorted(c.name for c in bpy.data.collections),
        "objects": sorted(ob.name for ob in scene.objects),
        "visible_objects": sorted(ob.name for ob in scene.objects if ob.visible_get()),
        "camera": scene.camera.name if scene.camera else None,
    }
    step("undone")

    # a wrong token: the message says where to fix it
    p.token = "wrong-token"
    with bpy.context.temp_override(window=window, area=area, region=sidebar):
        bpy.ops.realfusion.reconstruct('INVOKE_DEFAULT')
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not s.error_problem:
        yield 0.2
    REPORT_DATA["token_error"] = [s.error_problem, s.error_fix, s.error_kind]
    settle()
    yield 1.0
    screenshot("panel_error")
    p.token = ""
    step("error screenshot")


START = time.monotonic()
bpy.context.preferences.view.show_splash = False  # the splash screen would take the simulated clicks


def run():
    gen = scenario()

    def tick():
        try:
            wait = next(gen)
            return wait
        except StopIteration:
            finish(None)
        except Exception:  # noqa: BLE001 - into the report, then quit
            finish(traceback.format_exc())
        return None

    def finish(error):
        REPORT_DATA["error"] = error
        REPORT_DATA["seconds"] = round(time.monotonic() - START, 1)
        with open(REPORT, "w") as f:
            json.dump(REPORT_DATA, f, indent=2)
        print(f"gui: done in {REPORT_DATA['seconds']} s{'' if not error else ': ' + error}", flush=True)
        bpy.ops.wm.quit_blender()

    bpy.app.timers.register(tick, first_interval=1.0)


run()
