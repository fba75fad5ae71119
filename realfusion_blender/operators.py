# SPDX-License-Identifier: GPL-3.0-or-later
"""Operators, and the per-tick logic of the Reconstruct operator.

The Reconstruct operator is modal on a timer: a `JobWorker` (a follower process) does the HTTP, and on
every TIMER event `poll_job_once` applies what it learned to the scene (main thread), and
imports the result when the job is done. Background `bpy` never fires timers or modal
events, so tests call `start_job` and `poll_job_once` directly.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid

import bpy
from bpy.props import BoolProperty, StringProperty

from . import engine_process, importer, messages, preferences, previews, records
from .client import EngineError
from .jobs import ACTIVE_STATES, WORKERS, JobWorker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


# ---------------------------------------------------------------------------------------- the photo

class Photo:
    """The bytes sent to the engine, and where they came from (for names and the camera background)."""

    def __init__(self, data: bytes, filename: str, name: str, image=None, path: str = ""):
        self.data, self.filename, self.name, self.image, self.path = data, filename, name, image, path


def _unreadable(what: str) -> EngineError:
    return EngineError(f"Blender could not read the image {what}.",
                       "Pick a PNG or JPEG photo that opens in Blender's Image Editor.", kind="input")


def _stem(name: str) -> str:
    stem = os.path.splitext(os.path.basename(name))[0] or name
    return stem.strip() or "Photo"


def image_to_png(image) -> bytes:
    """The image's pixels as PNG bytes (for generated, packed non-PNG, or EXR/TIFF/... images)."""
    fd, tmp = tempfile.mkstemp(prefix="realfusion-", suffix=".png")
    os.close(fd)
    previous = image.file_format
    try:
        image.file_format = 'PNG'
        image.save(filepath=tmp, save_copy=True)
        with open(tmp, "rb") as f:
            data = f.read()
    except (RuntimeError, OSError) as exc:
        raise _unreadable(f"{image.name!r} ({exc})") from exc
    finally:
        image.file_format = previous
        os.unlink(tmp)
    if not data.startswith(PNG_MAGIC):
        raise _unreadable(repr(image.name))
    return data


def photo_from_image(image) -> Photo:
    name = _stem(image.name)
    path = bpy.path.abspath(image.filepath) if image.filepath else ""
    data = b""
    if image.packed_file is not None:
        data = bytes(image.packed_file.data)
    elif image.source == 'FILE' and path and os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    elif image.source == 'FILE':
        raise _unreadable(f"{image.name!r}: its file {path or '(none)'} is missing")
    if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        if image.size[0] == 0 or image.size[1] == 0:
            raise _unreadable(repr(image.name))
        data = image_to_png(image)
    filename = os.path.basename(path) if path else f"{name}.png"
    return Photo(data, filename, name, image=image, path=path)


def photo_from_file(filepath: str) -> Photo:
    path = bpy.path.abspath(filepath)
    if not filepath or not os.path.isfile(path):
        raise EngineError(f"The photo {path or '(none)'} does not exist.",
                          "Pick a photo file in the RealFusion panel, or switch Source to Image.", kind="input")
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        try:
            image = bpy.data.images.load(path, check_existing=False)
        except RuntimeError as exc:
            raise _unreadable(f"{path} ({exc})") from exc
        try:
            if image.size[0] == 0 or image.size[1] == 0:
                raise _unreadable(path)
            data = image_to_png(image)
        finally:
            bpy.data.images.remove(image)
    return Photo(data, os.path.basename(path), _stem(path), path=path)


def photo_for(settings, image_name: str = "") -> Photo:
    if image_name:
        image = bpy.data.images.get(image_name)
        if image is None:
            raise EngineError(f"There is no image {image_name!r} in this file.", "Pick another image.", kind="input")
        return photo_from_image(image)
    if settings.source == 'FILE':
        return photo_from_file(settings.filepath)
    if settings.image is None:
        raise EngineError("No photo is selected.",
                          "Pick an image in the RealFusion panel (or open one in the Image Editor).", kind="input")
    return photo_from_image(settings.image)


# ---------------------------------------------------------------------------------------- starting jobs

def output_root(context) -> str:
    prefs = preferences.get(context)
    folder = prefs.output_dir if prefs is not None else "//realfusion"
    if folder.startswith("//") and not bpy.data.filepath:  # unsaved file: no folder to be next to
        return os.path.join(tempfile.gettempdir(), folder[2:].strip("/\\") or "realfusion")
    return bpy.path.abspath(folder or "//realfusion")


def relocate_results(blend_path: str) -> list[str]:
    """Once the file is saved, move the results of its jobs out of the temporary folder next to it
    (Output Folder), and point the jobs and images at them there. Returns the new folders."""
    if not blend_path:
        return []
    prefs = preferences.get()
    folder = prefs.output_dir if prefs is not None else "//realfusion"
    if not folder.startswith("//"):
        return []
    relative = folder[2:].strip("/\\") or "realfusion"
    root = os.path.join(os.path.dirname(blend_path), relative)
    temp = os.path.join(tempfile.gettempdir(), relative, "")  # where output_root put them while unsaved
    moved = []
    for scene in bpy.data.scenes:
        for job in scene.realfusion.jobs:
            old = bpy.path.abspath(job.folder)
            worker = WORKERS.get(job.key)
            if not old.startswith(temp) or (worker is not None and worker.is_alive()):
                continue  # a job still downloading moves at a later save
            new = os.path.join(root, os.path.basename(old.rstrip("/\\")))
            if os.path.normpath(new) == os.path.normpath(old):
                continue
            if os.path.isdir(old):
                os.makedirs(root, exist_ok=True)
                shutil.copytree(old, new, dirs_exist_ok=True)
                shutil.rmtree(old, ignore_errors=True)
            job.folder = new
            for name in ("glb_path", "camera_path", "reference_path", "turntable_path"):
                path = getattr(job, name)
                if path and bpy.path.abspath(path).startswith(old):
                    setattr(job, name, os.path.join(new, os.path.relpath(bpy.path.abspath(path), old)))
            for image in bpy.data.images:
                if image.filepath and bpy.path.abspath(image.filepath).startswith(old):
                    image.filepath = os.path.join(new, os.path.relpath(bpy.path.abspath(image.filepath), old))
            records.remember(scene, job)
            moved.append(new)
    return moved


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "photo"


def advanced_overrides(settings) -> list[str]:
    """Engine config overrides (`section.key=value`) for the advanced options the user changed."""
    overrides = []
    if settings.steps:
        overrides.append(f"fit.iterations={settings.steps}")
    if settings.ti_steps:
        overrides.append(f"textual_inversion.steps={settings.ti_steps}")
    if settings.render_size:
        overrides += [f"render.ref_resolution={settings.render_size}",
                      f"render.random_resolution={settings.render_size}"]
    if settings.mesh_resolution:
        overrides.append(f"export.resolution={settings.mesh_resolution}")
    if settings.texture_size:
        overrides.append(f"export.texture_size={settings.texture_size}")
    return overrides


def _poll_interval(context) -> float:
    prefs = preferences.get(context)
    return (prefs.poll_interval if prefs is not None else 500) / 1000.0


def start_job(context, image_name: str = "", extra_overrides: list[str] | None = None) -> str:
    """Read the photo, add a job to the scene's list and start its worker. Returns the job's key.

    Raises EngineError (kind "input") for a photo that cannot be read; the scene is then unchanged.
    """
    scene = context.scene
    settings = scene.realfusion
    prefs = preferences.get(context)
    photo = photo_for(settings, image_name)
    preset = settings.preset if settings.preset != "DEFAULT" else (prefs.default_preset if prefs else "standard")
    key = uuid.uuid4().hex[:12]
    folder = os.path.join(output_root(context), f"{safe_name(photo.name)}-{key}")

    job = settings.jobs.add()
    job.key, job.name, job.state, job.preset, job.seed = key, photo.name, "submitting", preset, settings.seed
    job.image_name = photo.image.name if photo.image is not None else ""
    job.image_path = photo.path
    job.photo_filename = photo.filename
    job.folder = folder
    job.message = "Sending the photo to the engine"
    settings.active_job = len(settings.jobs) - 1
    settings.set_error()
    records.remember(scene, job)

    submission = {"image_png": photo.data, "filename": photo.filename, "preset": preset,
                  "method": settings.method, "seed": settings.seed,
                  "model": (prefs.model if prefs is not None else "") or None,
                  "overrides": advanced_overrides(settings) + list(extra_overrides or [])}
    initializer = settings.initializer.strip()
    if initializer:
        submission["initializer"] = initializer
    worker = JobWorker(preferences.make_client(context), key, folder, submission=submission,
                       poll_interval=_poll_interval(context))
    try:
        worker.start()
    except EngineError:
        remove_job(settings, key)  # the scene as it was
        raise
    WORKERS[key] = worker
    return key


def follow_job(context, key: str, resume: bool = False) -> JobWorker:
    """Start following a job that is already on the engine (after reopening the file, or after an error);
    resume: ask the engine to go on with an interrupted, failed or cancelled job first."""
    found = find_job(key)
    if found is None or not found[1].job_id:
        raise EngineError("That job never reached the engine.", "Press Reconstruct to submit it again.",
                          kind="input")
    job = found[1]
    worker = WORKERS.get(key)
    if worker is not None and worker.is_alive():
        return worker
    if worker is not None:
        worker.detach()  # an ended follower being replaced: its file goes
    job.error_problem = job.error_fix = job.error_kind = ""
    job.cancel_requested = False
    job.state, job.message = "checking", "Asking the engine"
    records.remember(found[0], job)
    worker = JobWorker(preferences.make_client(context), key, bpy.path.abspath(job.folder), job_id=job.job_id,
                       resume=resume, poll_interval=_poll_interval(context))
    worker.start()
    WORKERS[key] = worker
    return worker


def find_job(key: str):
    """(scene, job) for a job key, in whichever scene holds it."""
    for scene in bpy.data.scenes:
        job = scene.realfusion.job(key)
        if job is not None:
            return scene, job
    return None


# ---------------------------------------------------------------------------------------- per tick

def apply_update(scene, update):
    """Write one Update from the worker into the scene's job list (main thread). Returns the job, or None."""
    settings = scene.realfusion
    job = settings.job(update.key)
    if job is None:
        return None
    error = messages.for_user(update.error, job.photo_filename or job.name)
    if update.submit_failed:  # the job never reached the engine: the error goes to the panel, the entry away
        error = error or {}
        settings.set_error(error.get("problem", ""), error.get("fix", ""), error.get("kind", ""))
        remove_job(settings, update.key)
        return None
    if update.job_id:
        job.job_id = update.job_id
    if update.state:
        job.state = update.state
    if update.stage or update.state in ("queued", "done"):
        job.stage = update.stage
    job.step, job.total = update.step, update.total
    if update.message:
        job.message = messages.for_user({"problem": update.message}, job.photo_filename or job.name)["problem"]
    if update.progress is not None:
        job.progress = min(max(update.progress, 0.0), 1.0)
    if update.state == "done":
        job.progress = 1.0
    if update.eta is not None:
        job.eta = update.eta
    elif update.state != "running":
        job.eta = -1.0
    job.queue_position = -1 if update.queue_position is None else int(update.queue_position)
    if error:
        job.error_problem, job.error_fix, job.error_kind = error["problem"], error["fix"], error["kind"]
    elif update.state in ("queued", "running", "done"):
        job.error_problem = job.error_fix = job.error_kind = ""
    if update.state not in ("", "submitting", "checking", "queued", "running"):
        job.cancel_requested = False
    if update.preview_path:
        previews.show(job.key, update.preview_path)  # main thread, read at once: see previews.py
    if update.files:
        job.glb_path = update.files.get("mesh.glb", "")
        job.camera_path = update.files.get("camera.json", "")
        job.reference_path = update.files.get("reference.png", "")
        job.turntable_path = update.files.get("turntable.png", "")
    records.remember(scene, job)
    return job


def remove_job(settings, key: str) -> None:
    for index, job in enumerate(settings.jobs):
        if job.key == key:
            previews.forget(key)
            records.forget(key)
            settings.jobs.remove(index)
            settings.active_job = min(settings.active_job, max(len(settings.jobs) - 1, 0))
            return


def tag_redraw(context=None) -> None:
    wm = (context or bpy.context).window_manager
    for window in wm.windows:
        if window.screen is None:
            continue
        for area in window.screen.areas:
            if area.type in ('VIEW_3D', 'IMAGE_EDITOR', 'PREFERENCES'):
                area.tag_redraw()


def poll_job_once(context, key: str) -> str | None:
    """One tick: apply the worker's updates; import the result when it is there.

    Returns None while the job goes on, else how it ended: "imported", "done" (not imported:
    it belongs to another scene, or the import failed), "failed", "cancelled", "interrupted",
    "unreachable", or "gone" (the job left the list).
    """
    worker = WORKERS.get(key)
    updates = worker.drain() if worker is not None else []
    found = find_job(key)
    if found is None:  # removed from the list (or undone away): stop following, the engine goes on
        if worker is not None:
            worker.detach()
        WORKERS.pop(key, None)
        return "gone"
    scene, job = found
    for update in updates:
        if apply_update(scene, update) is None:
            break
    if updates:
        tag_redraw(context)
    if find_job(key) is None:
        WORKERS.pop(key, None)
        return "gone"
    if job.state in ACTIVE_STATES:
        if worker is None or worker.pending():
            return None
        return job.state  # the worker ended without a final word (detached)
    WORKERS.pop(key, None)
    if job.state == "done" and not job.imported and job.glb_path:
        if scene != context.scene:
            return "done"
        try:
            # undo=True: an operator called from Python pushes no undo step unless asked; this makes
            # the import one step of its own, which Ctrl+Z takes back (the job stays: records.py)
            bpy.ops.realfusion.import_result('EXEC_DEFAULT', True, key=key)
        except RuntimeError:  # its error report (raised only in background mode); the job keeps the error
            pass
        return "imported" if job.imported else "done"
    return job.state


# ---------------------------------------------------------------------------------------- operators

def _report_error(operator, settings, exc: EngineError) -> None:
    error = messages.for_user(exc.as_dict())
    settings.set_error(error["problem"], error["fix"], error["kind"])
    operator.report({'ERROR'}, f"RealFusion: {error['problem']} {error['fix']}")


class REALFUSION_OT_reconstruct(bpy.types.Operator):
    """Send the photo to the RealFusion engine and import the textured mesh and its camera when it is done"""

    bl_idname = "realfusion.reconstruct"
    bl_label = "Reconstruct"
    bl_options = {'REGISTER'}

    image_name: StringProperty(name="Image", description="Reconstruct this image instead of the panel's",
                               options={'SKIP_SAVE'})
    follow: StringProperty(name="Follow", description="Key of a job already on the engine to follow",
                           options={'SKIP_SAVE', 'HIDDEN'})
    resume: BoolProperty(name="Resume", description="Ask the engine to go on with the followed job first",
                         options={'SKIP_SAVE', 'HIDDEN'})

    _timer = None
    _key = ""

    def execute(self, context):
        settings = context.scene.realfusion
        try:
            if self.follow:
                follow_job(context, self.follow, resume=self.resume)
                self._key = self.follow
            else:
                self._key = start_job(context, self.image_name)
        except EngineError as exc:
            _report_error(self, settings, exc)
            return {'CANCELLED'}
        if context.window is None or bpy.app.background:
            return {'FINISHED'}  # nothing would tick the modal; the caller drives poll_job_once
        wm = context.window_manager
        self._timer = wm.event_timer_add(_poll_interval(context) / 2, window=context.window)
        wm.modal_handler_add(self)
        return {'RUNNING_MODAL'}

    def invoke(self, context, event):
        return self.execute(context)

    def modal(self, context, event):
        if event.type == 'ESC' and event.value == 'PRESS':
            if request_cancel(self._key):
                self.report({'INFO'}, "RealFusion: cancelling the reconstruction")
            return {'PASS_THROUGH'}
        if event.type != 'TIMER':
            return {'PASS_THROUGH'}
        outcome = poll_job_once(context, self._key)
        if outcome is None:
            return {'PASS_THROUGH'}
        self._end(context)
        found = find_job(self._key)
        job = found[1] if found else None
        if outcome == "imported":  # import_result said so
            return {'FINISHED'}
        if outcome == "gone":
            settings = context.scene.realfusion
            if settings.error_problem:
                self.report({'ERROR'}, f"RealFusion: {settings.error_problem} {settings.error_fix}")
            return {'CANCELLED'}
        if job is not None and job.error_problem:
            self.report({'ERROR'}, f"RealFusion: {job.error_problem} {job.error_fix}")
        elif job is not None:
            self.report({'WARNING'} if outcome != "done" else {'INFO'}, f"RealFusion: {job.name}: {job.message}")
        return {'CANCELLED'}

    def cancel(self, context):  # Blender ends the modal (a file is loaded, the window closes)
        self._end(context)

    def _end(self, context):
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None


class REALFUSION_OT_import_result(bpy.types.Operator):
    """Import the job's mesh into a new collection and add a camera where the photo was taken"""

    bl_idname = "realfusion.import_result"
    bl_label = "Import RealFusion Result"
    bl_options = {'REGISTER', 'UNDO'}

    key: StringProperty(name="Job", options={'HIDDEN', 'SKIP_SAVE'})

    def execute(self, context):
        settings = context.scene.realfusion
        job = settings.job(self.key)
        if job is None or not job.glb_path:
            self.report({'ERROR'}, "RealFusion: this job has no downloaded result; press Fetch Result first")
            return {'CANCELLED'}
        background, framing = (_background(job) if settings.use_background else (None, _framing_for(job)))
        try:
            result = importer.import_result(context, bpy.path.abspath(job.glb_path),
                                            bpy.path.abspath(job.camera_path), name=job.name,
                                            background=background, framing=framing)
        except importer.ImportProblem as exc:
            job.error_problem, job.error_fix, job.error_kind = exc.problem, exc.fix, "import"
            records.remember(context.scene, job)
            self.report({'ERROR'}, f"RealFusion: {exc.problem} {exc.fix}")
            return {'CANCELLED'}
        job.imported = True
        job.collection_name = result["collection"].name
        job.camera_name = result["camera"].name if result["camera"] is not None else ""
        job.hidden = ", ".join(result["hidden"])
        job.error_problem = job.error_fix = job.error_kind = ""
        records.remember(context.scene, job)
        note = f"; hid {job.hidden} (in front of the result; Alt+H shows it again)" if job.hidden else ""
        self.report({'INFO'}, f"RealFusion: imported {job.collection_name}{note}")
        return {'FINISHED'}


def _photo_image(job):
    """The user's own photo as an Image: the datablock it came from, else its file."""
    if job.image_name and job.image_name in bpy.data.images:
        return bpy.data.images[job.image_name]
    if job.image_path and os.path.isfile(bpy.path.abspath(job.image_path)):
        return importer.load_image(bpy.path.abspath(job.image_path))
    return None


def _framing_for(job, photo=None):
    """Where the engine's square reference view lies in the user's photo, if that photo is the one it framed."""
    framing = importer.photo_framing(bpy.path.abspath(job.reference_path)) if job.reference_path else None
    if framing is None or photo is None:
        return framing if photo is None else None
    if tuple(photo.size) != tuple(framing["size"]):  # e.g. an EXIF-rotated JPEG: Blender shows it unrotated
        return None
    return framing


def _background(job):
    """(image, framing): the user's photo with the camera widened to it, else the engine's reference view
    (it matches the square camera exactly), else nothing. A background from a temporary folder is packed
    into the .blend, so it outlives that folder."""
    photo = _photo_image(job)
    framing = _framing_for(job, photo) if photo is not None else None
    if photo is not None and framing is not None:
        return photo, framing
    if job.reference_path and os.path.isfile(bpy.path.abspath(job.reference_path)):
        image = importer.load_image(bpy.path.abspath(job.reference_path), f"{job.name} Reference")
        if bpy.path.abspath(job.reference_path).startswith(tempfile.gettempdir()) and image.packed_file is None:
            image.pack()
        return image, None
    return photo, None


class REALFUSION_OT_cancel(bpy.types.Operator):
    """Cancel this reconstruction on the engine (it keeps its last checkpoint)"""

    bl_idname = "realfusion.cancel"
    bl_label = "Cancel"
    bl_options = {'INTERNAL'}

    key: StringProperty(options={'HIDDEN', 'SKIP_SAVE'})

    def execute(self, context):
        worker = WORKERS.get(self.key)
        if worker is None or not worker.is_alive():
            found = find_job(self.key)
            if found is None or not found[1].job_id:
                return {'CANCELLED'}
            result = bpy.ops.realfusion.reconstruct('EXEC_DEFAULT', follow=self.key)
            if 'CANCELLED' in result:
                return {'CANCELLED'}
        request_cancel(self.key)
        return {'FINISHED'}


def request_cancel(key: str) -> bool:
    """Ask the worker to cancel and say so in the panel at once (the engine stops at its next step)."""
    worker = WORKERS.get(key)
    if worker is None:
        return False
    worker.cancel()
    found = find_job(key)
    if found is not None:
        scene, job = found
        job.cancel_requested = True
        job.eta = -1.0
        job.message = "Cancelling: the engine stops at the end of its current step"
        records.remember(scene, job)
        tag_redraw()
    return True


class REALFUSION_OT_follow(bpy.types.Operator):
    """Follow this job on the engine again and import its result when it is done"""

    bl_idname = "realfusion.follow"
    bl_label = "Fetch Result"
    bl_options = {'INTERNAL'}

    key: StringProperty(options={'HIDDEN', 'SKIP_SAVE'})
    resume: BoolProperty(name="Resume", options={'HIDDEN', 'SKIP_SAVE'},
                         description="Ask the engine to go on from the job's last checkpoint")

    @classmethod
    def description(cls, context, properties):
        if properties.resume:
            return "Ask the engine to go on with this job from its last checkpoint, and import the result"
        return None

    def execute(self, context):
        return bpy.ops.realfusion.reconstruct('EXEC_DEFAULT', follow=self.key, resume=self.resume)


class REALFUSION_OT_remove_job(bpy.types.Operator):
    """Remove this job from the list (the engine keeps its folder)"""

    bl_idname = "realfusion.remove_job"
    bl_label = "Remove Job"
    bl_options = {'INTERNAL'}  # no undo step: the job list is kept outside undo (records.py)

    key: StringProperty(options={'HIDDEN', 'SKIP_SAVE'})

    def execute(self, context):
        worker = WORKERS.pop(self.key, None)
        if worker is not None:
            worker.detach()
        remove_job(context.scene.realfusion, self.key)
        return {'FINISHED'}


class REALFUSION_OT_dismiss_error(bpy.types.Operator):
    """Hide this message"""

    bl_idname = "realfusion.dismiss_error"
    bl_label = "Dismiss"
    bl_options = {'INTERNAL'}

    def execute(self, context):
        context.scene.realfusion.set_error()
        return {'FINISHED'}


class REALFUSION_OT_engine_status(bpy.types.Operator):
    """Ask the engine whether it is running, on which device, and how many jobs wait"""

    bl_idname = "realfusion.engine_status"
    bl_label = "Status"

    def execute(self, context):
        client = preferences.make_client(context, timeout=3.0)
        engine_process.HEALTH.refresh(client)
        health = engine_process.HEALTH
        if health.error is not None:
            _report_error(self, context.scene.realfusion, health.error)
            return {'CANCELLED'}
        context.scene.realfusion.set_error()
        version = (health.info or {}).get("version", "?")
        self.report({'INFO'}, f"RealFusion: {health.summary()} (version {version}) at {client.base_url}")
        return {'FINISHED'}


class REALFUSION_OT_engine_start(bpy.types.Operator):
    """Start the engine (`realfusion serve`) from the environment set in the add-on's preferences"""

    bl_idname = "realfusion.engine_start"
    bl_label = "Start Engine"

    def execute(self, context):
        prefs = preferences.get(context)
        settings = context.scene.realfusion
        if prefs is None:
            self.report({'ERROR'}, "RealFusion: enable the add-on in the preferences first")
            return {'CANCELLED'}
        try:
            jobs_dir = bpy.path.abspath(prefs.engine_jobs_dir) if prefs.engine_jobs_dir else ""
            command = engine_process.serve_command(prefs.engine_python, prefs.server_url, prefs.model,
                                                   prefs.engine_device, jobs_dir)
            engine_process.PROCESS.start(command)
        except EngineError as exc:
            _report_error(self, settings, exc)
            return {'CANCELLED'}
        settings.set_error()
        _watch_startup(context)
        self.report({'INFO'}, f"RealFusion: starting the engine (log: {engine_process.PROCESS.log_path})")
        return {'FINISHED'}


def _watch_startup(context, seconds: float = 120.0) -> None:
    """Ask /health every second until the new engine answers (or exits), so the panel updates by itself."""
    client = preferences.make_client(context, timeout=2.0)
    deadline = time.monotonic() + seconds

    def check():
        health = engine_process.HEALTH
        if health.info is not None or time.monotonic() > deadline or not engine_process.PROCESS.running:
            tag_redraw()
            return None
        health.refresh_async(client)
        tag_redraw()
        return 1.0

    bpy.app.timers.register(check, first_interval=0.5)


class REALFUSION_OT_engine_stop(bpy.types.Operator):
    """Stop the engine this Blender session started (a running job is kept as interrupted: resume it later)"""

    bl_idname = "realfusion.engine_stop"
    bl_label = "Stop Engine"

    def execute(self, context):
        if not engine_process.PROCESS.stop():
            self.report({'WARNING'}, "RealFusion: no engine was started from this Blender session")
            return {'CANCELLED'}
        engine_process.HEALTH.info = None
        self.report({'INFO'}, "RealFusion: engine stopped")
        return {'FINISHED'}


def _done_job(operator, context, key: str):
    job = context.scene.realfusion.job(key)
    if job is None or not job.imported or job.collection_name not in bpy.data.collections:
        operator.report({'ERROR'}, "RealFusion: this result is not in the scene any more; press Import")
        return None
    return job


class REALFUSION_OT_view_camera(bpy.types.Operator):
    """Look through the result's camera (your photo behind the mesh)"""

    bl_idname = "realfusion.view_camera"
    bl_label = "View Through Camera"
    bl_options = {'INTERNAL'}

    key: StringProperty(options={'HIDDEN', 'SKIP_SAVE'})

    def execute(self, context):
        job = _done_job(self, context, self.key)
        camera = bpy.data.objects.get(job.camera_name) if job is not None else None
        if camera is None:
            return {'CANCELLED'}
        context.scene.camera = camera
        for area in (context.screen.areas if context.screen is not None else ()):
            if area.type == 'VIEW_3D':
                area.spaces.active.region_3d.view_perspective = 'CAMERA'
                area.tag_redraw()
        return {'FINISHED'}


class REALFUSION_OT_select_result(bpy.types.Operator):
    """Select the result's mesh, make it active and frame it"""

    bl_idname = "realfusion.select_result"
    bl_label = "Select Result"
    bl_options = {'INTERNAL', 'UNDO'}

    key: StringProperty(options={'HIDDEN', 'SKIP_SAVE'})

    def execute(self, context):
        job = _done_job(self, context, self.key)
        if job is None:
            return {'CANCELLED'}
        meshes = [ob for ob in bpy.data.collections[job.collection_name].objects if ob.type == 'MESH']
        for ob in context.view_layer.objects:
            ob.select_set(False)
        for ob in meshes:
            ob.select_set(True)
        if meshes:
            context.view_layer.objects.active = meshes[0]
        importer.frame_selected(context)
        return {'FINISHED'}


class REALFUSION_OT_open_folder(bpy.types.Operator):
    """Open the folder with the result's files (mesh.glb, camera.json, turntable.png)"""

    bl_idname = "realfusion.open_folder"
    bl_label = "Open Folder"
    bl_options = {'INTERNAL'}

    key: StringProperty(options={'HIDDEN', 'SKIP_SAVE'})

    def execute(self, context):
        found = find_job(self.key)
        folder = bpy.path.abspath(found[1].folder) if found else ""
        if not folder or not os.path.isdir(folder):
            self.report({'ERROR'}, f"RealFusion: the folder {folder or '(none)'} is gone")
            return {'CANCELLED'}
        bpy.ops.wm.path_open(filepath=folder)
        return {'FINISHED'}


class REALFUSION_OT_turntable(bpy.types.Operator):
    """Show the engine's turntable (the result seen from all around) in an Image Editor"""

    bl_idname = "realfusion.turntable"
    bl_label = "Turntable"
    bl_options = {'INTERNAL'}

    key: StringProperty(options={'HIDDEN', 'SKIP_SAVE'})

    def execute(self, context):
        found = find_job(self.key)
        path = bpy.path.abspath(found[1].turntable_path) if found and found[1].turntable_path else ""
        if not path or not os.path.isfile(path):
            self.report({'ERROR'}, "RealFusion: the engine made no turntable for this job")
            return {'CANCELLED'}
        image = importer.load_image(path)
        editors = [a for a in (context.screen.areas if context.screen else ()) if a.type == 'IMAGE_EDITOR']
        if editors:
            editors[0].spaces.active.image = image
        else:
            bpy.ops.wm.path_open(filepath=path)  # no Image Editor open: the system's viewer
        return {'FINISHED'}


class REALFUSION_OT_open_preferences(bpy.types.Operator):
    """Open the RealFusion add-on's preferences"""

    bl_idname = "realfusion.open_preferences"
    bl_label = "Engine Settings"
    bl_options = {'INTERNAL'}

    def execute(self, context):
        bpy.ops.screen.userpref_show('INVOKE_DEFAULT')
        context.preferences.active_section = 'ADDONS'
        bpy.ops.preferences.addon_show(module=preferences.ADDON_ID)
        return {'FINISHED'}


classes = (
    REALFUSION_OT_reconstruct,
    REALFUSION_OT_import_result,
    REALFUSION_OT_cancel,
    REALFUSION_OT_follow,
    REALFUSION_OT_remove_job,
    REALFUSION_OT_dismiss_error,
    REALFUSION_OT_engine_status,
    REALFUSION_OT_engine_start,
    REALFUSION_OT_engine_stop,
    REALFUSION_OT_view_camera,
    REALFUSION_OT_select_result,
    REALFUSION_OT_open_folder,
    REALFUSION_OT_turntable,
    REALFUSION_OT_open_preferences,
)

register, unregister = bpy.utils.register_classes_factory(classes)
