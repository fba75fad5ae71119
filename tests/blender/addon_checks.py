"""Checks of the RealFusion add-on inside Blender (the bpy module), run by tests/test_blender_addon.py.

    python addon_checks.py REPORT.json ASSETS.json [check_name ...]

Background bpy never fires timers or modal events, so the Reconstruct operator's per-tick
logic (`start_job`, `poll_job_once`, `apply_update`) is driven directly, against
`fake_engine.FakeEngine` on loopback. Every check starts from File > New.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time

import bpy

from bpy_helpers import (FakeContext, FakeLayout, disable_addon, draw_panel, drive, enable_addon, run_checks,
                         scene_state, silhouette, wait_for)
from fake_engine import FakeEngine

ASSETS: dict = {}
TMP = tempfile.mkdtemp(prefix="realfusion-checks-")


def prefs():
    return bpy.context.preferences.addons["realfusion_blender"].preferences


def use_engine(url: str) -> None:
    prefs().server_url = url
    prefs().poll_interval = 100


def fake_engine(mode: str = "ok", **kwargs) -> FakeEngine:
    return FakeEngine(ASSETS["folder"], mode=mode, **kwargs).start()


@contextlib.contextmanager
def serving(mode: str = "ok", **kwargs):
    """A fake engine the add-on's preferences point at, for the length of a `with`."""
    with fake_engine(mode, **kwargs) as engine:
        use_engine(engine.url)
        yield engine


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def load_photo(path=None):
    image = bpy.data.images.load(path or ASSETS["photo_png"], check_existing=False)
    settings = bpy.context.scene.realfusion
    settings.source = 'IMAGE'
    settings.image = image
    return image


def operator_result(operator, **kwargs) -> str:
    """FINISHED / CANCELLED, or "error" when it reported an error (background bpy raises on those)."""
    try:
        return next(iter(operator(**kwargs)))
    except RuntimeError:
        return "error"


def our_threads():
    return [t for t in threading.enumerate() if t.name.startswith("realfusion")]


def running_followers():
    from realfusion_blender import jobs

    return jobs.running_followers()


# ------------------------------------------------------------------------------------------- registration

def addon_footprint() -> dict:
    from realfusion_blender import MODULES, health_tick, on_load_pre

    return {
        "types": sorted({n for n in dir(bpy.types) if "realfusion" in n.lower()}
                        | {cls.__name__ for module in MODULES for cls in module.classes if cls.is_registered}),
        "scene_property": hasattr(bpy.types.Scene, "realfusion"),
        "operators": sorted(n for n in dir(bpy.ops.realfusion)),
        "load_pre": on_load_pre in bpy.app.handlers.load_pre,
        "timer": bpy.app.timers.is_registered(health_tick),
        "enabled": "realfusion_blender" in bpy.context.preferences.addons,
    }


def check_register_unregister_leaves_nothing_behind():
    enabled = addon_footprint()
    assert enabled["scene_property"] and enabled["load_pre"] and enabled["timer"] and enabled["enabled"]
    for name in ("REALFUSION_OT_reconstruct", "REALFUSION_OT_import_result", "REALFUSION_OT_cancel",
                 "REALFUSION_OT_engine_start", "REALFUSION_OT_engine_stop", "REALFUSION_OT_engine_status",
                 "VIEW3D_PT_realfusion", "IMAGE_PT_realfusion", "REALFUSION_UL_jobs", "RealFusionSettings"):
        assert name in enabled["types"], (name, enabled["types"])

    # A job in flight when the add-on is disabled: its worker stops, the engine keeps the job.
    from realfusion_blender.operators import find_job, poll_job_once, start_job

    try:
        with serving("slow") as engine:
            load_photo()
            key = start_job(bpy.context)
            # the job's id has reached the scene (a follower detached before that cancels the job it
            # submitted: nobody could ever fetch it)
            wait_for(lambda: poll_job_once(bpy.context, key) is None and find_job(key)[1].job_id,
                     what="the submission")
            disable_addon()
            gone = addon_footprint()
            assert gone["types"] == [] and not gone["scene_property"] and not gone["load_pre"] \
                and not gone["timer"] and not gone["enabled"], gone
            wait_for(lambda: not running_followers(), timeout=5, what="the job's follower process to end")
            assert not our_threads()  # Blender's process runs no Python thread of ours (jobs.py says why)
            assert ("DELETE", "/jobs/job1") not in engine.requests  # disabling is not cancelling
    finally:
        if "realfusion_blender" not in bpy.context.preferences.addons:
            enable_addon()
    again = addon_footprint()
    assert again == enabled, (again, enabled)  # and it comes back the same


def check_properties_and_preferences_exist():
    settings = bpy.context.scene.realfusion
    for name in ("source", "image", "filepath", "preset", "method", "seed", "initializer", "steps", "ti_steps",
                 "render_size", "mesh_resolution", "texture_size", "use_background", "jobs", "active_job"):
        assert name in settings.bl_rna.properties, name
    assert "show_advanced" not in settings.bl_rna.properties
    assert {item.identifier for item in settings.bl_rna.properties["preset"].enum_items} >= {"fast", "standard",
                                                                                            "paper"}
    p = prefs()
    assert p.server_url == "http://127.0.0.1:8765"
    for name in ("token", "token_file", "model", "default_preset", "output_dir", "engine_python", "engine_device"):
        assert name in p.bl_rna.properties, name
    layout = FakeLayout()

    class PreferencesSelf:  # the real preferences, with a fake layout
        def __getattr__(self, name):
            return layout if name == "layout" else getattr(p, name)

    type(p).draw(PreferencesSelf(), bpy.context)
    assert {"realfusion.engine_start", "realfusion.engine_stop", "realfusion.engine_status"} <= set(
        layout.operators())


# ------------------------------------------------------------------------------------------- panels

def check_panels_draw_in_every_state():
    from realfusion_blender import panels
    from realfusion_blender.jobs import Update
    from realfusion_blender.operators import apply_update

    settings = bpy.context.scene.realfusion
    empty = draw_panel(panels.VIEW3D_PT_realfusion)
    assert "realfusion.open_preferences" in empty.operators()  # always a way to the preferences
    assert "= Standard" in empty.texts()  # what "Default" stands for
    assert "realfusion.reconstruct" in draw_panel(panels.VIEW3D_PT_realfusion_run).operators()
    # Advanced comes before Reconstruct: sub-panels draw in the order they are registered
    order = [cls.__name__ for cls in panels.classes]
    assert order.index("VIEW3D_PT_realfusion_advanced") < order.index("VIEW3D_PT_realfusion_run")
    assert any(c.get("property") == "image" for c in empty.calls("template_ID"))
    assert draw_panel(panels.VIEW3D_PT_realfusion_jobs).calls("template_list") == []
    draw_panel(panels.VIEW3D_PT_realfusion_advanced)

    image = load_photo()
    with_image = draw_panel(panels.VIEW3D_PT_realfusion)
    assert with_image.calls("template_icon"), "no thumbnail of the photo"
    settings.source = 'FILE'
    assert any(c.get("property") == "filepath" for c in draw_panel(panels.VIEW3D_PT_realfusion).calls("prop"))
    settings.source = 'IMAGE'

    settings.set_error("The RealFusion engine is not running at http://127.0.0.1:8765 (connection refused).",
                       "Start the engine with `realfusion serve` in the engine's Python environment.", "offline")
    offline = draw_panel(panels.VIEW3D_PT_realfusion)
    assert "realfusion serve" in offline.flowing_text() and "not running" in offline.flowing_text()
    assert "realfusion.open_preferences" in offline.operators()  # no engine path set yet: where to set it
    prefs().engine_python = sys.executable
    assert "realfusion.engine_start" in draw_panel(panels.VIEW3D_PT_realfusion).operators()
    prefs().engine_python = ""
    settings.set_error()

    # Jobs in each state, the running one with a live preview
    for key, state in (("a", "running"), ("b", "queued"), ("c", "done"), ("d", "failed"), ("e", "interrupted")):
        job = settings.jobs.add()
        job.key, job.name, job.job_id, job.state = key, f"photo {key}", f"job-{key}", state
    apply_update(bpy.context.scene, Update("a", state="running", stage="fit", step=30, total=100, progress=0.55,
                                           message="Fitting the 3D field (30/100)", eta=125.0,
                                           preview_path=ASSETS["preview_png"]))
    apply_update(bpy.context.scene, Update("d", state="failed", message="out of memory",
                                           error={"problem": "The GPU ran out of memory.",
                                                  "fix": "Use the fast preset.", "kind": "engine"}))
    from realfusion_blender import jobs as jobs_module

    class Following:  # stands for a live worker of job "a"
        def is_alive(self):
            return True

    for index, expect in ((0, "realfusion.cancel"), (1, "realfusion.cancel"), (2, "realfusion.follow"),
                          (4, "realfusion.follow")):
        settings.active_job = index
        layout = draw_panel(panels.VIEW3D_PT_realfusion_jobs)
        assert layout.calls("template_list"), "no job list"
        assert expect in layout.operators(), (index, layout.operators())
        if index == 0:
            progress = layout.calls("progress")
            assert progress and abs(progress[0]["factor"] - 0.55) < 1e-6 and progress[0]["type"] == 'BAR'
            assert "55%" in progress[0]["text"] and "left" not in progress[0]["text"], progress  # nobody follows it
            jobs_module.WORKERS["a"] = Following()
            try:
                followed = draw_panel(panels.VIEW3D_PT_realfusion_jobs).calls("progress")[0]["text"]
            finally:
                jobs_module.WORKERS.pop("a")
            assert "min left" in followed, followed
            assert "Fitting the 3D shape 30/100" in layout.flowing_text(), layout.texts()
            assert len(layout.calls("template_icon")) == 1, "no live preview"
    settings.active_job = 3
    failed = draw_panel(panels.VIEW3D_PT_realfusion_jobs)
    assert failed.flowing_text().count("The GPU ran out of memory.") == 1, failed.texts()
    assert "Use the fast preset." in failed.flowing_text()
    assert "realfusion.follow" in failed.operators()  # out of memory may pass: Resume
    job_d = settings.jobs[3]
    apply_update(bpy.context.scene, Update("d", state="failed", message="bad photo",
                                           error={"problem": "No object found in the photo.",
                                                  "fix": "Use another photo.", "kind": "engine"}))
    assert job_d.error_kind == "engine"
    again = draw_panel(panels.VIEW3D_PT_realfusion_jobs)
    assert "realfusion.follow" not in again.operators(), "Resume offered for an error that would recur"

    # the first token step: no stale "loading" story, no ETA
    apply_update(bpy.context.scene, Update("a", state="running", stage="prior", progress=0.05, eta=None))
    settings.active_job = 0
    assert "then the first token step" in draw_panel(panels.VIEW3D_PT_realfusion_jobs).flowing_text()

    # a done job that is in the scene: look through its camera, select it, its folder, its turntable
    job_c = settings.jobs[2]
    job_c.imported, job_c.collection_name, job_c.hidden = True, "photo c", "Cube"
    settings.active_job = 2
    done = draw_panel(panels.VIEW3D_PT_realfusion_jobs)
    for name in ("realfusion.view_camera", "realfusion.select_result", "realfusion.open_folder",
                 "realfusion.turntable"):
        assert name in done.operators(), (name, done.operators())
    assert "Hid Cube" in done.flowing_text()

    # long text wraps to the sidebar's width (a 280 px sidebar: no line longer than fits)
    class Region:
        width = 280

    narrow = FakeLayout()
    panels.wrapped_labels(narrow, "word " * 60, FakeContext(region=Region()))
    lines = [c["text"] for c in narrow.calls("label")]
    assert len(lines) > 3 and max(len(line) for line in lines) * panels.CHAR_WIDTH <= 280 - 32, lines
    boxed = FakeLayout()
    panels.wrapped_labels(boxed, "word " * 60, FakeContext(region=Region()), boxed=True)
    assert max(len(c["text"]) for c in boxed.calls("label")) * panels.CHAR_WIDTH <= 280 - 60

    # The list's rows
    row = FakeLayout()
    panels.REALFUSION_UL_jobs.draw_item(None, bpy.context, row, settings, settings.jobs[0], 0, settings,
                                        "active_job", 0)
    assert "5%" in row.texts() and "55%" not in row.texts()  # job "a" went back to the model's stage above

    # Image Editor: its own image is the photo
    class Space:
        pass

    space = Space()
    space.image = image
    draw_panel(panels.IMAGE_PT_realfusion, FakeContext(space_data=space))
    editor = draw_panel(panels.IMAGE_PT_realfusion_run, FakeContext(space_data=space))
    ops = [c for c in editor.log if c[0] == "operator_property" and c[1] == "realfusion.reconstruct"]
    assert ("operator_property", "realfusion.reconstruct", "image_name", image.name) in ops
    draw_panel(panels.IMAGE_PT_realfusion_jobs)


# ------------------------------------------------------------------------------------------- per tick

def check_apply_update_moves_progress_and_stores_errors():
    from realfusion_blender.jobs import Update
    from realfusion_blender.operators import apply_update

    scene = bpy.context.scene
    settings = scene.realfusion
    job = settings.jobs.add()
    job.key, job.name = "k1", "photo"
    assert apply_update(scene, Update("nope", state="running")) is None  # unknown key: ignored
    apply_update(scene, Update("k1", state="queued", job_id="j1", message="Waiting", queue_position=2))
    assert (job.job_id, job.state, job.queue_position) == ("j1", "queued", 2)
    apply_update(scene, Update("k1", state="running", stage="textual_inversion", step=5, total=50, progress=0.1,
                               message="Learning", eta=None))
    assert abs(job.progress - 0.1) < 1e-6 and job.stage == "textual_inversion" and job.eta == -1.0
    apply_update(scene, Update("k1", state="running", stage="fit", step=1, total=10, progress=0.6, eta=42.0,
                               preview_path=ASSETS["preview_png"]))
    assert abs(job.progress - 0.6) < 1e-6 and job.eta == 42.0 and job.queue_position == -1
    from realfusion_blender import previews

    assert previews.size("k1")[0] > 0  # loaded at once, on this (the main) thread
    images = len(bpy.data.images)
    for step in range(2, 6):
        apply_update(scene, Update("k1", state="running", stage="fit", step=step, total=10, progress=0.6 + step / 100,
                                   preview_path=ASSETS["preview_png"]))
    assert len(bpy.data.images) == images  # previews are icons, no Image datablocks (see previews.py)
    assert len(previews._shown["k1"]) == previews.KEEP  # old ones freed a few previews later
    apply_update(scene, Update("k1", state="running", progress=1.7))
    assert job.progress == 1.0  # clamped
    apply_update(scene, Update("k1", state="failed", message="boom",
                               error={"problem": "No GPU.", "fix": "Use --device cpu.", "kind": "engine"}))
    assert (job.state, job.error_problem, job.error_fix, job.error_kind) == ("failed", "No GPU.", "Use --device cpu.",
                                                                             "engine")
    apply_update(scene, Update("k1", state="running", progress=0.2))  # resumed: the error goes away
    assert job.error_problem == "" and job.state == "running"

    # A submission that never reached the engine: the entry goes, the error stays on the panel
    apply_update(scene, Update("k1", state="failed", submit_failed=True,
                               error={"problem": "Not running.", "fix": "Start it.", "kind": "offline"}))
    assert len(settings.jobs) == 0
    assert (settings.error_problem, settings.error_fix, settings.error_kind) == ("Not running.", "Start it.",
                                                                                 "offline")


def check_eta_estimate():
    from realfusion_blender.jobs import EtaEstimator

    now = [0.0]
    eta = EtaEstimator(clock=lambda: now[0])
    assert eta("queued", 0.0) is None
    assert eta("running", 0.2) is None  # the first sample only starts the clock
    now[0] = 10.0
    assert abs(eta("running", 0.4) - 30.0) < 1e-6  # 0.2 per 10 s, 0.6 to go
    assert eta("done", 1.0) is None


# ------------------------------------------------------------------------------------------- the photo

def check_photo_bytes_for_every_kind_of_image():
    from realfusion_blender.client import EngineError
    from realfusion_blender.operators import photo_for, photo_from_file, photo_from_image

    settings = bpy.context.scene.realfusion
    with open(ASSETS["photo_png"], "rb") as f:
        png = f.read()
    assert photo_from_file(ASSETS["photo_png"]).data == png  # PNG and JPEG go as they are
    assert photo_from_file(ASSETS["photo_jpg"]).data[:3] == b"\xff\xd8\xff"
    bmp = photo_from_file(ASSETS["photo_bmp"])  # anything else is converted to PNG
    assert bmp.data.startswith(b"\x89PNG") and bmp.name == "photo" and bmp.filename == "photo.bmp"
    assert not [i for i in bpy.data.images if i.filepath.endswith("photo.bmp")]  # the temporary image is gone

    image = load_photo()
    photo = photo_from_image(image)
    assert photo.data == png and photo.name == "photo" and photo.image == image
    image.pack()
    assert photo_from_image(image).data == png  # packed: from the .blend, not the disk
    generated = bpy.data.images.new("Painted", 16, 8)
    generated.pixels[:] = [0.5] * (16 * 8 * 4)
    data = photo_from_image(generated).data
    assert data.startswith(b"\x89PNG") and generated.file_format == 'PNG'
    exr = bpy.data.images.new("Float", 8, 8, float_buffer=True)
    exr.file_format = 'OPEN_EXR'
    assert photo_from_image(exr).data.startswith(b"\x89PNG") and exr.file_format == 'OPEN_EXR'  # restored

    for bad in ("", os.path.join(TMP, "missing.png")):
        settings.source = 'FILE'
        settings.filepath = bad
        try:
            photo_for(settings)
        except EngineError as exc:
            assert exc.kind == "input" and "Pick a photo" in exc.fix, exc
        else:
            raise AssertionError("a missing photo was accepted")
    notes = os.path.join(TMP, "notes.tif")
    with open(notes, "w") as f:
        f.write("not an image")
    settings.filepath = notes
    try:
        photo_for(settings)
    except EngineError as exc:
        assert exc.kind == "input" and "could not read" in exc.problem, exc
    else:
        raise AssertionError("a file that is no image was accepted")
    settings.source = 'IMAGE'
    settings.image = None
    try:
        photo_for(settings)
    except EngineError as exc:
        assert "No photo is selected" in exc.problem
    else:
        raise AssertionError("no photo was accepted")
    broken = bpy.data.images.load(ASSETS["broken_png"], check_existing=False)
    try:
        photo_from_image(broken)  # it starts like a PNG: sent as is, the engine judges it
    except EngineError:
        pass
    missing = bpy.data.images.load(ASSETS["photo_png"], check_existing=False)
    missing.filepath = os.path.join(TMP, "gone.png")
    try:
        photo_from_image(missing)
    except EngineError as exc:
        assert "could not read" in exc.problem and "missing" in exc.problem, exc.problem
    else:
        raise AssertionError("an image whose file is gone was accepted")


def check_output_folder_next_to_the_blend_or_temporary():
    from realfusion_blender.operators import output_root

    assert output_root(bpy.context).startswith(tempfile.gettempdir())  # unsaved file
    blend = os.path.join(TMP, "project", "scene.blend")
    os.makedirs(os.path.dirname(blend), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=blend)
    assert output_root(bpy.context) == os.path.join(os.path.dirname(blend), "realfusion")
    prefs().output_dir = os.path.join(TMP, "elsewhere")
    try:
        assert output_root(bpy.context) == os.path.join(TMP, "elsewhere")
    finally:
        prefs().output_dir = "//realfusion"


# ------------------------------------------------------------------------------------------- the client

def check_client_maps_connection_refused_to_start_the_engine():
    from realfusion_blender.client import EngineClient, EngineError

    url = closed_port_url()
    start = time.monotonic()
    try:
        EngineClient(url, timeout=3).health()
    except EngineError as exc:
        assert exc.kind == "offline", exc.kind
        assert f"not running at {url}" in exc.problem and "connection refused" in exc.problem, exc.problem
        assert exc.fix.startswith("Start the engine with `realfusion serve`"), exc.fix
    else:
        raise AssertionError("no error from a closed port")
    assert time.monotonic() - start < 2.0  # refused at once, no waiting for a timeout


def check_token_is_read_from_the_engines_data_folder_by_default():
    from realfusion_blender import preferences

    p = prefs()
    data_dir = os.path.join(TMP, "engine-data")
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "token"), "w") as f:
        f.write("from-the-file\n")
    own_file = os.path.join(TMP, "own-token")
    with open(own_file, "w") as f:
        f.write("from-my-file")
    try:
        p.engine_jobs_dir = data_dir
        assert preferences.make_client().token == "from-the-file"  # Token field empty: the data folder's file
        p.token_file = own_file
        assert preferences.make_client().token == "from-my-file"  # a token file set in the preferences
        p.token = "typed"
        assert preferences.make_client().token == "typed"  # the field wins
        p.token, p.token_file = "", ""
        p.engine_jobs_dir = os.path.join(TMP, "no-engine-here")
        assert preferences.make_client().token == ""  # no file: no token (the engine then answers 401)
    finally:
        p.token, p.token_file, p.engine_jobs_dir = "", "", ""


def check_client_maps_engine_errors():
    from realfusion_blender.client import EngineClient, EngineError

    def error_of(call):
        try:
            call()
        except EngineError as exc:
            return exc
        raise AssertionError("no error")

    with fake_engine("token") as engine:
        exc = error_of(lambda: EngineClient(engine.url).health())
        assert exc.kind == "auth" and exc.status == 401 and "token" in exc.problem.lower(), exc
        assert EngineClient(engine.url, token="secret").health()["ok"] is True  # sent as a bearer token
        exc = error_of(lambda: EngineClient(engine.url, token="secret").job("nope"))
        assert exc.kind == "engine" and exc.status == 404 and exc.problem == "There is no job 'nope' on this server."
    with fake_engine("reject") as engine:
        exc = error_of(lambda: EngineClient(engine.url).submit(b"\x89PNG....", "a.png"))
        assert (exc.problem, exc.fix) == ("No object found in the photo (the mask is empty).",
                                          "Use a photo where the object stands out from the background.")  # verbatim
        assert engine.submissions[0]["image"] == b"\x89PNG...." and engine.submissions[0]["preset"] == "standard"
    with fake_engine("garbage") as engine:
        exc = error_of(lambda: EngineClient(engine.url).health())
        assert exc.kind == "protocol" and "not JSON" in exc.problem
    with fake_engine("crash") as engine:
        exc = error_of(lambda: EngineClient(engine.url).health())
        assert exc.kind == "engine" and exc.status == 500 and "HTTP 500" in exc.problem
    exc = error_of(lambda: EngineClient("http://no-such-host.invalid:8765", timeout=3).health())
    assert exc.kind == "offline"


# ------------------------------------------------------------------------------------------- import

def check_importer_brings_the_textured_mesh_and_the_camera():
    from realfusion_blender import importer

    scene = bpy.context.scene
    existing = bpy.data.objects.new("Existing", None)
    scene.collection.objects.link(existing)
    existing.select_set(True)
    photo = load_photo()
    result = importer.import_result(bpy.context, ASSETS["mesh_glb"], ASSETS["camera_json"], name="photo",
                                    background=photo)
    collection, camera = result["collection"], result["camera"]
    assert collection.name == "photo" and collection.name in scene.collection.children
    kinds = sorted(ob.type for ob in collection.objects)
    assert kinds == ["CAMERA", "MESH"], kinds  # tidy: no empties, no second camera
    mesh = result["meshes"][0]
    assert mesh.name == "photo" and mesh.parent is None
    assert bpy.context.view_layer.objects.active == mesh and mesh.select_get() and not existing.select_get()
    assert not camera.select_get()

    # textured: an image texture feeds the base color
    material = mesh.active_material
    assert material is not None and material.use_nodes
    bsdf = next(n for n in material.node_tree.nodes if n.type == 'BSDF_PRINCIPLED')
    link = bsdf.inputs["Base Color"].links[0]
    assert link.from_node.type == 'TEX_IMAGE' and tuple(link.from_node.image.size) == (64, 64)
    assert len(mesh.data.uv_layers) == 1

    # the mesh is where the GLB put it: the sphere's center at the origin, Z up (marker on +X)
    xs = [(mesh.matrix_world @ v.co).x for v in mesh.data.vertices]
    zs = [(mesh.matrix_world @ v.co).z for v in mesh.data.vertices]
    assert abs(max(zs) - 0.5) < 0.01 and abs(min(zs) + 0.5) < 0.01 and abs(max(xs) - 0.68) < 0.01

    # the camera: where camera.json says, the scene's camera, render size to the image's aspect
    expected = ASSETS["camera_matrix"]
    for i in range(4):
        for j in range(4):
            assert abs(camera.matrix_world[i][j] - expected[i][j]) < 1e-5, (camera.matrix_world, expected)
    assert abs(camera.data.lens - ASSETS["camera_lens"]) < 1e-4 and camera.data.sensor_width == 36.0
    assert scene.camera == camera
    assert scene.render.resolution_x == scene.render.resolution_y == 1024  # 256 px scaled up, square kept
    backgrounds = camera.data.background_images
    assert camera.data.show_background_images and backgrounds[0].image == photo

    # seen through it: the sphere centered with the radius the numbers give, the marker on the right
    mask = silhouette(scene, camera, [mesh], size=64)
    import numpy as np

    ys, xs = np.nonzero(mask)
    sphere = mask.copy()
    sphere[:, 50:] = False  # the sphere ends at column 48.6, the marker starts at column 51
    radius = math.sqrt(sphere.sum() / math.pi) / 32
    assert abs(radius - ASSETS["sphere_radius_fraction"]) < 0.03, (radius, ASSETS["sphere_radius_fraction"])
    cy, cx = np.nonzero(sphere)
    assert abs(cx.mean() - 31.5) < 1.0 and abs(cy.mean() - 31.5) < 1.5, (cx.mean(), cy.mean())
    assert mask[:, 51:].any() and not mask[:, :14].any(), "the +X marker is not on the right of the view"


def check_importer_lines_the_photo_up_from_the_engines_framing():
    """The engine's reference view is a square cut of the photo; the camera then frames the whole photo."""
    import numpy as np

    from realfusion_blender import importer

    scene = bpy.context.scene
    framing = {"box": [40.0, 10.0, 168.0, 138.0], "size": [256, 192]}  # a 128 px square, left and high
    result = importer.import_result(bpy.context, ASSETS["mesh_glb"], ASSETS["camera_json"], name="photo",
                                    framing=framing)
    camera = result["camera"]
    assert (scene.render.resolution_x, scene.render.resolution_y) == (1024, 768)  # the photo's aspect
    mask = silhouette(scene, camera, result["meshes"], size=64)
    sphere = mask.copy()
    sphere[:, 34:] = False  # the +X marker: the sphere reaches about 24 columns right of its center here
    ys, xs = np.nonzero(sphere)
    # the box's center (104, 74) in photo pixels, on the 64 x 64 grid over the 256 x 192 photo
    assert abs(xs.mean() + 0.5 - 104 / 256 * 64) < 1.0 and abs(ys.mean() + 0.5 - 74 / 192 * 64) < 1.0, \
        (xs.mean(), ys.mean())
    width = (xs.max() - xs.min() + 1) / 64 * 256  # in photo pixels: the sphere's width in the 128 px box
    assert abs(width - ASSETS["sphere_radius_fraction"] * 128) < 8, width  # the fraction is of the half side

    # and reference.png says where the engine cut it (PNG text), read with the standard library only
    path = os.path.join(TMP, "framed.png")
    image = bpy.data.images.new("framed", 4, 4)
    image.filepath_raw, image.file_format = path, 'PNG'
    image.save()
    with open(path, "rb") as f:
        data = f.read()
    import struct
    import zlib

    text = b"realfusion:framing\0" + json.dumps(framing).encode()
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    with open(path, "wb") as f:
        f.write(data[:33] + chunk + data[33:])  # after the IHDR chunk
    assert importer.photo_framing(path) == framing
    assert importer.photo_framing(ASSETS["photo_png"]) is None


def check_importer_hides_what_stands_in_front_of_the_result():
    """Blender's startup scene has a 2 m Cube at the origin, around the mesh: hidden, and said so."""
    from realfusion_blender import importer

    scene = bpy.context.scene
    bpy.ops.mesh.primitive_cube_add(size=2.0)
    cube = bpy.context.active_object
    bpy.ops.mesh.primitive_cube_add(size=0.5, location=(0, 40, 0))  # far behind the mesh: stays
    behind = bpy.context.active_object
    result = importer.import_result(bpy.context, ASSETS["mesh_glb"], ASSETS["camera_json"], name="photo")
    assert result["hidden"] == [cube.name], result["hidden"]
    assert not cube.visible_get() and cube.hide_render and behind.visible_get() and not behind.hide_render
    assert not importer.find_occluders(scene, result["camera"], result["meshes"])


def check_the_job_list_survives_an_undo():
    """Background Blender keeps no undo history; what an undo does to the list is done by hand here
    (the job goes, as the scene is restored to before it), then the undo_post handler's work."""
    from realfusion_blender import records
    from realfusion_blender.jobs import Update
    from realfusion_blender.operators import apply_update

    scene = bpy.context.scene
    settings = scene.realfusion
    for key in ("first", "second"):
        job = settings.jobs.add()
        job.key, job.name, job.job_id = key, key, f"job-{key}"
        records.remember(scene, job)
    apply_update(scene, Update("second", state="done", job_id="job-second", progress=1.0))
    settings.jobs[1].imported, settings.jobs[1].collection_name = True, "gone-collection"
    records.remember(scene, settings.jobs[1])
    settings.jobs.remove(1)
    settings.jobs.remove(0)  # the undo restored a scene from before both
    assert records.restore() == ["first", "second"]
    assert [j.key for j in settings.jobs] == ["first", "second"]
    second = settings.jobs[1]
    assert second.state == "done" and second.job_id == "job-second"
    assert not second.imported and second.collection_name == ""  # its collection was undone: Import again
    from realfusion_blender.operators import remove_job

    remove_job(settings, "first")
    assert records.restore() == [] and [j.key for j in settings.jobs] == ["second"]

    # a redo brings the import back: the file's word on it stands (the record said "not imported")
    kept = bpy.data.collections.new("kept")
    second.imported, second.collection_name = True, kept.name
    assert records.restore() == [] and second.imported and second.collection_name == "kept"


def check_results_move_next_to_the_blend_when_it_is_saved():
    from realfusion_blender.operators import find_job, start_job

    with serving("ok", running_polls=1):
        load_photo()
        key = start_job(bpy.context)
        assert drive(bpy.context, key)[0] == "imported"
    job = find_job(key)[1]
    old = job.folder
    assert old.startswith(tempfile.gettempdir()) and os.path.isfile(os.path.join(old, "mesh.glb"))
    background = bpy.context.scene.camera.data.background_images[0].image
    assert background.packed_file is not None  # from a temporary folder: packed, it outlives the folder
    blend = os.path.join(TMP, "saved-later", "scene.blend")
    os.makedirs(os.path.dirname(blend), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=blend)
    job = find_job(key)[1]
    expected = os.path.join(TMP, "saved-later", "realfusion", os.path.basename(old))
    assert job.folder == expected and os.path.isfile(os.path.join(expected, "mesh.glb")), (job.folder, expected)
    assert job.glb_path == os.path.join(expected, "mesh.glb") and not os.path.exists(old)


def check_messages_speak_of_the_add_on():
    from realfusion_blender import messages

    token = messages.for_user({"problem": "The bearer token is wrong.",
                               "fix": "Send the header `Authorization: Bearer <token>` with the token in /x/token "
                                      "(curl ...).", "kind": "auth"})
    assert "Set Token" in token["fix"] and "Engine Data Folder" in token["fix"] and "curl" not in token["fix"]
    model = messages.for_user({"problem": "The Stable Diffusion weights are not on this computer.",
                               "fix": "Download them once with `huggingface-cli download ...` (or pass --model "
                                      "/path/to/folder).", "kind": "engine"})
    assert model["kind"] == "model" and "Model" in model["fix"] and "huggingface-cli" not in model["fix"]
    small = messages.for_user({"problem": "Input image /home/u/.local/share/realfusion/jobs/ab12/input.png is "
                                          "20x20 pixels; its short side must be at least 64 pixels.",
                               "fix": "Use a larger photo.", "kind": "engine"}, photo="teddy.jpg")
    assert "teddy.jpg" in small["problem"] and "input.png" not in small["problem"], small
    assert messages.stage_label("textual_inversion") == "Learning the object's token"
    assert not messages.recoverable("failed", "engine") and messages.recoverable("failed", "resource")
    assert messages.recoverable("interrupted", "")


def check_importer_uses_the_glb_camera_when_there_is_no_camera_json():
    from realfusion_blender import importer

    result = importer.import_result(bpy.context, ASSETS["mesh_glb"], "", name="photo")
    camera = result["camera"]
    assert camera is not None and camera.name == "photo Camera" and bpy.context.scene.camera == camera
    assert sorted(ob.type for ob in result["collection"].objects) == ["CAMERA", "MESH"]
    expected = ASSETS["camera_matrix"]  # the GLB's camera node agrees with camera.json
    for i in range(3):
        for j in range(4):
            assert abs(camera.matrix_world[i][j] - expected[i][j]) < 1e-4, (camera.matrix_world, expected)
    fovy = 2 * math.atan(camera.data.sensor_height / 2 / camera.data.lens) if camera.data.sensor_fit == 'VERTICAL' \
        else 2 * math.atan(camera.data.sensor_width / 2 / camera.data.lens)
    assert abs(math.degrees(fovy) - 55.0) < 0.01, (camera.data.sensor_fit, camera.data.lens)


def check_importer_errors_leave_the_scene_unchanged():
    from realfusion_blender import importer

    before = scene_state()
    bad_camera = os.path.join(TMP, "bad_camera.json")
    with open(bad_camera, "w") as f:
        json.dump({"location": [0, -2, 0]}, f)  # no orientation, no lens
    for glb, camera in ((os.path.join(TMP, "missing.glb"), ASSETS["camera_json"]), (ASSETS["mesh_glb"], bad_camera)):
        try:
            importer.import_result(bpy.context, glb, camera, name="x")
        except importer.ImportProblem as exc:
            assert exc.problem and exc.fix
        else:
            raise AssertionError("no ImportProblem")
        assert scene_state() == before, (scene_state(), before)


def check_camera_json_is_read_defensively():
    from mathutils import Matrix

    from realfusion_blender.importer import parse_camera

    matrix = Matrix(ASSETS["camera_matrix"])
    rows = [list(r) for r in matrix]
    spec = parse_camera({"matrix_world": rows, "fovy_deg": 55.0, "width": 200, "height": 100})
    assert spec.sensor_fit == 'VERTICAL'
    assert abs(2 * math.atan(spec.sensor_height / 2 / spec.lens) - math.radians(55.0)) < 1e-6
    assert (spec.width, spec.height) == (200, 100)
    spec = parse_camera({"camera": {"rotation": [list(r)[:3] for r in matrix.to_3x3()],
                                    "location": list(matrix.translation), "yfov": math.radians(55.0),
                                    "resolution": [64, 64]}})
    assert all(abs(spec.matrix_world[i][j] - matrix[i][j]) < 1e-6 for i in range(4) for j in range(4))
    assert spec.sensor_fit == 'VERTICAL' and (spec.width, spec.height) == (64, 64)
    opencv = parse_camera({"matrix_world": rows, "lens": 50, "convention": "opencv"})
    assert abs((opencv.matrix_world.col[1].xyz + matrix.col[1].xyz).length) < 1e-6  # y flipped
    spec = parse_camera({"location": [1, 2, 3], "rotation_euler": [0.1, 0.2, 0.3], "lens_mm": 35})
    assert tuple(spec.matrix_world.translation) == (1, 2, 3) and spec.lens == 35


# ------------------------------------------------------------------------------------------- jobs end to end

def check_reconstruct_against_a_fake_engine_imports_the_result():
    from realfusion_blender.operators import find_job, start_job

    with serving("ok", running_polls=4) as engine:
        settings = bpy.context.scene.realfusion
        load_photo()
        settings.preset = "fast"
        settings.seed = 7
        settings.steps = 300
        settings.texture_size = 1024
        key = start_job(bpy.context)
        job = find_job(key)[1]
        assert job.state == "submitting" and job.folder.startswith(tempfile.gettempdir())
        outcome, snapshots = drive(bpy.context, key)
        assert outcome == "imported", (outcome, job.error_problem, snapshots)
        sub = engine.submissions[0]
        assert (sub["preset"], sub["seed"], sub["method"], sub["filename"]) == ("fast", 7, "realfusion", "photo.png")
        assert sub["overrides"] == ["fit.iterations=300", "export.texture_size=1024"] and sub["model"] is None
        assert "initializer" not in sub  # Object Name empty: the engine's default word
        progress = [s["progress"] for s in snapshots]
        assert progress == sorted(progress) and progress[-1] == 1.0, progress
        states = [s["state"] for s in snapshots]
        assert "running" in states and states[-1] == "done", states
        assert any(s["preview"] for s in snapshots), "the preview never showed"
        for name in ("mesh.glb", "camera.json", "reference.png", "preview.png"):
            assert os.path.isfile(os.path.join(job.folder, name)), name
        assert job.imported and job.collection_name == "photo"
        collection = bpy.data.collections["photo"]
        assert sorted(ob.type for ob in collection.objects) == ["CAMERA", "MESH"]
        camera = bpy.context.scene.camera
        assert camera.name == "photo Camera"
        background = camera.data.background_images[0].image
        assert background.filepath.endswith("reference.png")  # the engine's framing of the photo
        assert bpy.context.view_layer.objects.active.name == "photo"
        assert not our_threads()  # the job was followed by a process, never a thread of Blender's


def check_several_jobs_run_side_by_side():
    from realfusion_blender.operators import start_job

    with serving("ok", running_polls=2) as engine:
        load_photo()
        first = start_job(bpy.context)
        bpy.context.scene.realfusion.initializer = " teddy "
        second = start_job(bpy.context, image_name=load_photo(ASSETS["photo_jpg"]).name)
        wait_for(lambda: len(engine.submissions) == 2, what="both submissions")
        by_name = {sub["filename"]: sub for sub in engine.submissions}
        assert "initializer" not in by_name["photo.png"] and by_name["photo.jpg"]["initializer"] == "teddy"
        settings = bpy.context.scene.realfusion
        assert [j.key for j in settings.jobs] == [first, second] and settings.active_job == 1
        assert drive(bpy.context, first)[0] == "imported" and drive(bpy.context, second)[0] == "imported"
        assert sorted(c.name for c in bpy.data.collections) == ["photo", "photo.001"]


def check_failures_leave_the_scene_unchanged():
    from realfusion_blender.operators import find_job, start_job

    load_photo()
    settings = bpy.context.scene.realfusion
    before = scene_state()

    # engine down: the error (with the way to start it) is on the panel, no job in the list
    use_engine(closed_port_url())
    outcome, _ = drive(bpy.context, start_job(bpy.context))
    assert outcome == "gone" and len(settings.jobs) == 0
    assert settings.error_kind == "offline" and "realfusion serve" in settings.error_fix
    assert scene_state() == before

    # wrong token
    with serving("token"):
        prefs().token = "wrong"
        try:
            assert drive(bpy.context, start_job(bpy.context))[0] == "gone"
            assert settings.error_kind == "auth" and "token" in settings.error_problem.lower()
        finally:
            prefs().token = ""
    assert scene_state() == before

    # the engine refuses the photo, and a job that fails on the engine: its words, verbatim
    with serving("reject"):
        assert drive(bpy.context, start_job(bpy.context))[0] == "gone"
        assert settings.error_problem == "No object found in the photo (the mask is empty)."
    with serving("fail"):
        key = start_job(bpy.context)
        assert drive(bpy.context, key)[0] == "failed"
        job = find_job(key)[1]
        assert job.error_problem == "The GPU ran out of memory (CUDA out of memory)."
        assert job.error_fix == "Use the fast preset, or close other programs that use the GPU."
    assert scene_state() == before

    # the engine's mesh is unreadable: the job is done, not imported, and says so
    with serving("broken"):
        key = start_job(bpy.context)
        assert drive(bpy.context, key)[0] == "done"
        job = find_job(key)[1]
        assert not job.imported and job.error_kind == "import" and "could not read" in job.error_problem
    assert scene_state() == before


def check_a_failed_job_resumes_on_the_engine():
    from realfusion_blender import panels
    from realfusion_blender.operators import find_job, start_job

    with serving("fail") as engine:
        load_photo()
        key = start_job(bpy.context)
        assert drive(bpy.context, key)[0] == "failed"
        layout = draw_panel(panels.VIEW3D_PT_realfusion_jobs)
        assert ("operator_property", "realfusion.follow", "resume", True) in layout.log  # the Resume button
        assert bpy.ops.realfusion.follow(key=key, resume=True) == {'FINISHED'}
        assert drive(bpy.context, key)[0] == "imported"
        assert ("POST", "/jobs/job1/resume") in engine.requests and len(engine.submissions) == 1
        assert find_job(key)[1].error_problem == ""


def check_a_killed_follower_is_a_clear_failure_and_check_again_follows_anew():
    from realfusion_blender import jobs
    from realfusion_blender.operators import find_job, poll_job_once, start_job

    with serving("ok", running_polls=6) as engine:
        load_photo()
        key = start_job(bpy.context)
        wait_for(lambda: poll_job_once(bpy.context, key) is None and find_job(key)[1].state == "running",
                 what="the job to run")
        jobs.WORKERS[key].follower.kill()  # the follower process dies mid-job (the engine goes on)
        outcome, _ = drive(bpy.context, key)
        job = find_job(key)[1]
        assert outcome == "failed" and "follower stopped" in job.error_problem, (outcome, job.error_problem)
        assert "Check Again" in job.error_fix and job.job_id == "job1"
        assert ("DELETE", "/jobs/job1") not in engine.requests
        assert bpy.ops.realfusion.follow(key=key) == {'FINISHED'}
        assert drive(bpy.context, key)[0] == "imported" and len(engine.submissions) == 1


def check_the_panels_health_check_runs_in_a_follower_process():
    from realfusion_blender import engine_process, jobs
    from realfusion_blender.client import EngineClient

    health = engine_process.Health()
    with fake_engine("ok") as engine:
        health.refresh_async(EngineClient(engine.url, token="secret", timeout=2.0))
        assert health.check is not None and not our_threads()  # a process, not a thread
        wait_for(health.collect, what="the health answer")
    assert health.info["version"] == "0.0-fake" and health.error is None
    health.refresh_async(EngineClient(closed_port_url(), timeout=2.0))
    wait_for(health.collect, what="the health answer of a stopped engine")
    assert health.info is None and health.error.kind == "offline"
    assert not jobs.running_followers()


def check_the_health_timer_checks_only_while_a_panel_shows_the_engine():
    from realfusion_blender import engine_process, health_tick, jobs, panels

    health = engine_process.HEALTH
    with serving("ok"):
        health.shown, health.info, health.error = 0.0, None, None
        assert health_tick() == 5.0 and health.check is None  # nobody looks: no process
        draw_panel(panels.VIEW3D_PT_realfusion)  # the sidebar draws the engine's line
        assert health_tick() == 0.2 and health.check is not None
        wait_for(lambda: health_tick() == 5.0, what="the health answer")
        assert health.info["version"] == "0.0-fake" and health.check is None
    assert not jobs.running_followers()


def check_a_follower_that_cannot_start_is_an_error_and_leaves_nothing():
    import glob

    from realfusion_blender.client import EngineError
    from realfusion_blender.operators import start_job

    with serving("ok") as engine:
        load_photo()
        before, files = scene_state(), set(glob.glob(os.path.join(tempfile.gettempdir(), "realfusion-*")))
        saved, sys.executable = sys.executable, os.path.join(TMP, "no-such-python")
        try:
            start_job(bpy.context)
        except EngineError as exc:
            assert "Python was not found" in exc.problem and exc.fix, exc
        else:
            raise AssertionError("a job started without a Python to follow it")
        finally:
            sys.executable = saved
        assert scene_state() == before and not engine.submissions
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "realfusion-*"))) == files


def check_a_job_whose_blender_went_away_during_its_submission_is_cancelled():
    from realfusion_blender import jobs
    from realfusion_blender.operators import start_job

    with serving("slow", submit_delay=1.0) as engine:
        load_photo()
        key = start_job(bpy.context)
        wait_for(lambda: engine.jobs, what="the submission")
        jobs.WORKERS.pop(key).detach()  # Blender closes before the job's id came back
        wait_for(lambda: ("DELETE", "/jobs/job1") in engine.requests, what="the orphan job's cancel")
        wait_for(lambda: not jobs.running_followers(), timeout=5, what="the follower to end")


def check_cancel_reaches_the_engine():
    from realfusion_blender.operators import find_job, poll_job_once, start_job

    with serving("slow") as engine:
        load_photo()
        before = scene_state()
        key = start_job(bpy.context)
        wait_for(lambda: poll_job_once(bpy.context, key) is None and find_job(key)[1].state == "running",
                 what="the job to run")
        assert bpy.ops.realfusion.cancel(key=key) == {'FINISHED'}
        outcome, _ = drive(bpy.context, key)
        assert outcome == "cancelled" and ("DELETE", "/jobs/job1") in engine.requests
        assert scene_state() == before


def check_a_job_survives_closing_the_file_and_is_fetched_later():
    from realfusion_blender import jobs
    from realfusion_blender.operators import find_job, poll_job_once, start_job

    with serving("ok", running_polls=3) as engine:
        load_photo()
        blend = os.path.join(TMP, "survive", "scene.blend")
        os.makedirs(os.path.dirname(blend), exist_ok=True)
        bpy.ops.wm.save_as_mainfile(filepath=blend)
        key = start_job(bpy.context)
        wait_for(lambda: poll_job_once(bpy.context, key) is None and find_job(key)[1].job_id, what="a job id")
        bpy.ops.wm.save_mainfile()
        bpy.ops.wm.read_homefile(use_empty=True)  # Blender "closes" the file: we stop following the job
        assert key not in jobs.WORKERS
        wait_for(lambda: not running_followers(), timeout=5, what="the job's follower process to stop")
        bpy.ops.wm.open_mainfile(filepath=blend)
        job = find_job(key)[1]
        assert job.job_id == "job1" and job.state in ("queued", "running") and not job.imported
        assert ("DELETE", "/jobs/job1") not in engine.requests
        assert bpy.ops.realfusion.follow(key=key) == {'FINISHED'}  # the panel's Fetch Result
        assert drive(bpy.context, key)[0] == "imported"
        assert find_job(key)[1].folder.startswith(os.path.join(TMP, "survive", "realfusion"))


# ------------------------------------------------------------------------------------------- the engine

def check_engine_launcher_starts_checks_and_stops_an_engine():
    from realfusion_blender import engine_process
    from realfusion_blender.client import EngineError

    venv = os.path.join(TMP, "venv")
    os.makedirs(os.path.join(venv, "bin"), exist_ok=True)
    launcher = os.path.join(venv, "bin", "realfusion")  # what `pip install` puts in an engine environment
    fake = os.path.join(os.path.dirname(__file__), "fake_engine.py")
    with open(launcher, "w") as f:
        f.write(f"#!/bin/sh\nexec '{sys.executable}' '{fake}' \"$@\"\n")
    os.chmod(launcher, 0o755)
    assert engine_process.resolve_command(venv) == [launcher]
    assert engine_process.resolve_command(sys.executable) == [sys.executable, "-m", "engine.cli"]
    for bad in ("", os.path.join(TMP, "nothing-here"), TMP):
        try:
            engine_process.resolve_command(bad)
        except EngineError as exc:
            assert exc.kind == "input" and exc.fix
        else:
            raise AssertionError(f"{bad!r} was accepted")

    url = closed_port_url()
    command = engine_process.serve_command(venv, url, model="tiny", device="cpu", data_dir=TMP)
    assert command[1:] == ["serve", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--model", "tiny",
                           "--device", "cpu", "--data-dir", TMP]
    # without a data folder, the engine's default one: the add-on then knows where the token file is
    assert engine_process.serve_command(venv, url)[-2:] == ["--data-dir", engine_process.default_data_dir()]

    p = prefs()
    p.engine_python, p.server_url = venv, url
    assert operator_result(bpy.ops.realfusion.engine_status) == "error"  # not running yet: says so
    assert bpy.context.scene.realfusion.error_kind == "offline"
    try:
        assert bpy.ops.realfusion.engine_start() == {'FINISHED'}
        assert bpy.context.scene.realfusion.error_problem == ""
        wait_for(lambda: operator_result(bpy.ops.realfusion.engine_status) == "FINISHED", timeout=20, interval=0.2,
                 what="the started engine to answer")
        assert engine_process.HEALTH.info["version"] == "0.0-fake"
        assert "Engine on cpu" == engine_process.HEALTH.summary()
        assert "Engine running (pid" in engine_process.describe()
    finally:
        assert bpy.ops.realfusion.engine_stop() == {'FINISHED'}
    assert not engine_process.PROCESS.running and "exited" in engine_process.describe()
    assert operator_result(bpy.ops.realfusion.engine_status) == "error"
    p.engine_python = ""


def check_operator_flags_make_the_import_one_undo_step():
    from realfusion_blender import operators

    assert operators.REALFUSION_OT_import_result.bl_options == {'REGISTER', 'UNDO'}
    # The modal operator has no UNDO flag on purpose: its import goes through import_result, whose
    # UNDO flag makes the glTF import inside it part of the same single step.
    assert 'UNDO' not in operators.REALFUSION_OT_reconstruct.bl_options


def main(argv: list[str]) -> int:
    report, assets, *only = argv
    with open(assets) as f:
        ASSETS.update(json.load(f))
    enable_addon()
    return run_checks(globals(), report, only)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
