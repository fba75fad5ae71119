# SPDX-License-Identifier: GPL-3.0-or-later
"""The RealFusion sidebar (N panel) in the 3D Viewport and the Image Editor."""

from __future__ import annotations

import textwrap
import time

import bpy

from . import engine_process, messages, preferences, previews
from .jobs import ACTIVE_STATES, WORKERS

STATE_ICONS = {
    "submitting": 'EXPORT',
    "checking": 'FILE_REFRESH',
    "queued": 'SORTTIME',
    "running": 'PLAY',
    "done": 'CHECKMARK',
    "failed": 'ERROR',
    "cancelled": 'CANCEL',
    "interrupted": 'PAUSE',
    "unreachable": 'UNLINKED',
}
HAS_PROGRESS = "progress" in bpy.types.UILayout.bl_rna.functions  # UILayout.progress: Blender 4.0+
# Measured in Blender's sidebar (tests/test_blender_gui.py's screenshots): the UI font averages about 5.6 px a
# character at scale 1; a label loses ~36 px to the panel's margins, one inside an error box with an icon ~100.
CHAR_WIDTH = 6.0
LABEL_MARGIN = 36
BOX_MARGIN = 100


def format_eta(seconds: float) -> str:
    if seconds < 0:
        return ""
    if seconds < 90:
        return f"{max(1, round(seconds))} s left"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min left"
    return f"{seconds / 3600:.1f} h left"


def following(job) -> bool:
    worker = WORKERS.get(job.key)
    return worker is not None and worker.is_alive()


def state_text(job) -> str:
    if job.imported:
        return "Imported"
    if job.cancel_requested and job.state in ACTIVE_STATES:
        return "Cancelling"
    if job.state == "running":
        return f"{round(job.progress * 100)}%"
    if job.state == "queued" and job.queue_position > 0:
        return f"Queued (#{job.queue_position + 1})"
    return job.state.capitalize()


def stage_text(job) -> str:
    """What the engine is doing, in words; the first token step is slow and reported only when it ends."""
    if job.stage == "prior":
        return "Loading the model, then the first token step"
    label = messages.stage_label(job.stage)
    return label + (f" {job.step}/{job.total}" if job.total and job.stage != "done" else "")


def progress_text(job) -> str:
    parts = [f"{round(job.progress * 100)}%"]
    if job.state == "running" and following(job) and not job.cancel_requested:  # a stale ETA says nothing
        eta = format_eta(job.eta)
        if eta:
            parts.append(eta)
    return " · ".join(parts)


def wrapped_labels(layout, text: str, context=None, icon='NONE', boxed: bool = False) -> None:
    """A long message as several labels, wrapped to the sidebar's width (font and margins scaled)."""
    region = getattr(context, "region", None) if context is not None else None
    width = getattr(region, "width", 0) or 280
    prefs = getattr(context, "preferences", None) if context is not None else None
    scale = getattr(getattr(prefs, "system", None), "ui_scale", 1.0) or 1.0
    chars = max(16, int((width - (BOX_MARGIN if boxed else LABEL_MARGIN) * scale) / (CHAR_WIDTH * scale)))
    for index, line in enumerate(textwrap.wrap(text, chars) or [""]):
        layout.label(text=line, icon=icon if index == 0 else 'BLANK1' if icon != 'NONE' else 'NONE')


def draw_error(layout, context, problem: str, fix: str, kind: str, dismiss: bool = False) -> None:
    box = layout.box()
    box.alert = True
    col = box.column(align=True)
    wrapped_labels(col, problem, context, icon='ERROR', boxed=True)
    if fix:
        col.separator()
        wrapped_labels(col, fix, context, icon='INFO', boxed=True)
    if kind == "offline":
        row = box.row(align=True)
        prefs = preferences.get(context)
        if prefs is not None and prefs.engine_python:
            row.operator("realfusion.engine_start", icon='PLAY')
        else:
            row.operator("realfusion.open_preferences", icon='PREFERENCES')
        row.operator("realfusion.engine_status", text="Retry", icon='FILE_REFRESH')
    elif kind in ("auth", "model"):
        box.operator("realfusion.open_preferences", icon='PREFERENCES')
    if dismiss:
        box.operator("realfusion.dismiss_error", icon='X')


def draw_engine(layout, context) -> None:
    health = engine_process.HEALTH
    health.shown = time.monotonic()  # someone looks at it: the health timer keeps it fresh
    row = layout.row(align=True)
    icon = 'CHECKMARK' if health.info else 'ERROR' if health.error is not None else 'QUESTION'
    row.label(text=health.summary(), icon=icon)
    if health.info is None and not engine_process.PROCESS.running:
        prefs = preferences.get(context)
        if prefs is not None and prefs.engine_python:
            row.operator("realfusion.engine_start", text="", icon='PLAY')
    row.operator("realfusion.engine_status", text="", icon='FILE_REFRESH')
    row.operator("realfusion.open_preferences", text="", icon='PREFERENCES')


def draw_photo(layout, settings) -> None:
    layout.row().prop(settings, "source", expand=True)
    if settings.source == 'IMAGE':
        layout.template_ID(settings, "image", open="image.open")
        if settings.image is not None:
            layout.template_icon(icon_value=layout.icon(settings.image), scale=6.0)
    else:
        layout.prop(settings, "filepath", text="")


def _labelled(layout, settings, name: str, label: str) -> None:
    """Label and field side by side, the label a third of the width (property split truncates them)."""
    split = layout.split(factor=0.34, align=True)
    split.label(text=label)
    split.prop(settings, name, text="")


def default_preset(context) -> str:
    prefs = preferences.get(context)
    return prefs.default_preset if prefs is not None else "standard"


def draw_options(layout, settings, context=None) -> None:
    col = layout.column(align=True)
    _labelled(col, settings, "preset", "Preset")
    if settings.preset == "DEFAULT":
        name = default_preset(context).capitalize()
        row = col.split(factor=0.34)
        row.label(text="")
        row.label(text=f"= {name}")  # the preferences' Default Preset
    _labelled(col, settings, "method", "Method")
    _labelled(col, settings, "seed", "Seed")
    _labelled(col, settings, "initializer", "Object")


def draw_job(layout, context, job) -> None:
    """The selected job: progress, stage, live preview, and what can be done with it."""
    col = layout.column()
    col.label(text=job.name, icon=STATE_ICONS.get(job.state, 'QUESTION'))
    active = job.state in ACTIVE_STATES
    if active or job.state == "done":
        text = progress_text(job)
        if HAS_PROGRESS:
            col.progress(factor=job.progress, type='BAR', text=text)
        else:  # Blender 3.6: no progress widget, the numbers as a label
            col.label(text=text, icon='TIME')
    if active and job.cancel_requested:
        wrapped_labels(col, job.message, context, icon='CANCEL')
    elif job.state == "running" and job.stage:
        wrapped_labels(col, stage_text(job), context)
    elif active and job.message:
        wrapped_labels(col, job.message, context)
    if previews.size(job.key)[0]:
        col.template_icon(icon_value=previews.icon_id(job.key), scale=8.0)
    if job.error_problem:  # the problem and its fix, once (the job's message repeats the problem)
        draw_error(col, context, job.error_problem, job.error_fix, job.error_kind)
    elif not active and job.message and job.state != "done":
        wrapped_labels(col, job.message, context)
    if job.hidden:
        wrapped_labels(col, f"Hid {job.hidden}: in front of the result (Alt+H shows it)", context, icon='HIDE_ON')

    row = col.row(align=True)
    is_followed = following(job)
    if active:
        if not is_followed and job.job_id:
            row.operator("realfusion.follow", icon='FILE_REFRESH').key = job.key
        sub = row.row(align=True)
        sub.enabled = not job.cancel_requested
        sub.operator("realfusion.cancel", icon='CANCEL').key = job.key
    elif job.job_id and (job.state == "unreachable"
                         or job.state == "failed" and job.error_kind not in ("engine", "resource", "model",
                                                                             "input", "auth")):
        # we lost track of it (engine gone, a download failed): ask the engine again
        row.operator("realfusion.follow", text="Check Again", icon='FILE_REFRESH').key = job.key
    elif job.job_id and messages.recoverable(job.state, job.error_kind):
        op = row.operator("realfusion.follow", text="Resume", icon='PLAY')
        op.key, op.resume = job.key, True
    elif job.state == "done" and not job.imported:
        if job.glb_path:
            row.operator("realfusion.import_result", text="Import", icon='IMPORT').key = job.key
        else:
            row.operator("realfusion.follow", icon='IMPORT').key = job.key
    if not is_followed:
        row.operator("realfusion.remove_job", text="", icon='X').key = job.key
    if job.state == "done" and job.imported:
        grid = col.grid_flow(row_major=True, columns=2, even_columns=True, align=True)
        grid.operator("realfusion.view_camera", text="Camera", icon='VIEW_CAMERA').key = job.key
        grid.operator("realfusion.select_result", text="Select", icon='RESTRICT_SELECT_OFF').key = job.key
        grid.operator("realfusion.open_folder", text="Folder", icon='FILE_FOLDER').key = job.key
        sub = grid.row(align=True)
        sub.enabled = bool(job.turntable_path)
        sub.operator("realfusion.turntable", text="Turntable", icon='FILE_MOVIE').key = job.key


class REALFUSION_UL_jobs(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0, flt_flag=0):
        row = layout.row(align=True)
        row.label(text=item.name, icon=STATE_ICONS.get(item.state, 'QUESTION'))
        row.label(text=state_text(item))


class RealFusionPanelMixin:
    bl_region_type = 'UI'
    bl_category = "RealFusion"

    @classmethod
    def poll(cls, context):
        return getattr(context.scene, "realfusion", None) is not None


class RealFusionMainPanel(RealFusionPanelMixin):
    bl_label = "RealFusion"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.realfusion
        draw_engine(layout, context)
        if settings.error_problem:
            draw_error(layout, context, settings.error_problem, settings.error_fix, settings.error_kind,
                       dismiss=True)
        image = self.editor_image(context)
        if image is not None:
            layout.template_icon(icon_value=layout.icon(image), scale=6.0)
        else:
            draw_photo(layout, settings)
        draw_options(layout, settings, context)

    def editor_image(self, context):
        return None


class RealFusionAdvancedPanel(RealFusionPanelMixin):
    """Drawn between the options and Reconstruct (sub-panels follow their parent's own content)."""

    bl_label = "Advanced"
    bl_options = {'DEFAULT_CLOSED'}

    def draw(self, context):
        settings = context.scene.realfusion
        col = self.layout.column(align=True)
        col.label(text="0: the preset's value")
        col.prop(settings, "ti_steps")
        col.prop(settings, "steps")
        col.prop(settings, "render_size")
        col.prop(settings, "mesh_resolution")
        col.prop(settings, "texture_size")
        self.layout.prop(settings, "use_background")


class RealFusionRunPanel(RealFusionPanelMixin):
    """The Reconstruct button, after Advanced."""

    bl_label = "Reconstruct"
    bl_options = {'HIDE_HEADER'}

    def draw(self, context):
        row = self.layout.row()
        row.scale_y = 1.5
        op = row.operator("realfusion.reconstruct", icon='MESH_MONKEY')
        image = self.editor_image(context)
        if image is not None:
            op.image_name = image.name

    def editor_image(self, context):
        return None


class RealFusionJobsPanel(RealFusionPanelMixin):
    bl_label = "Jobs"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.realfusion
        if not len(settings.jobs):
            layout.label(text="No reconstructions yet")
            return
        layout.template_list("REALFUSION_UL_jobs", "", settings, "jobs", settings, "active_job", rows=3)
        if 0 <= settings.active_job < len(settings.jobs):
            draw_job(layout, context, settings.jobs[settings.active_job])


class VIEW3D_PT_realfusion(RealFusionMainPanel, bpy.types.Panel):
    bl_space_type = 'VIEW_3D'


class VIEW3D_PT_realfusion_advanced(RealFusionAdvancedPanel, bpy.types.Panel):
    bl_space_type = 'VIEW_3D'
    bl_parent_id = "VIEW3D_PT_realfusion"


class VIEW3D_PT_realfusion_run(RealFusionRunPanel, bpy.types.Panel):
    bl_space_type = 'VIEW_3D'
    bl_parent_id = "VIEW3D_PT_realfusion"


class VIEW3D_PT_realfusion_jobs(RealFusionJobsPanel, bpy.types.Panel):
    bl_space_type = 'VIEW_3D'
    bl_parent_id = "VIEW3D_PT_realfusion"


class IMAGE_PT_realfusion(RealFusionMainPanel, bpy.types.Panel):
    """In the Image Editor the photo is the editor's image."""

    bl_space_type = 'IMAGE_EDITOR'

    def editor_image(self, context):
        space = context.space_data
        return getattr(space, "image", None)


class IMAGE_PT_realfusion_advanced(RealFusionAdvancedPanel, bpy.types.Panel):
    bl_space_type = 'IMAGE_EDITOR'
    bl_parent_id = "IMAGE_PT_realfusion"


class IMAGE_PT_realfusion_run(RealFusionRunPanel, bpy.types.Panel):
    bl_space_type = 'IMAGE_EDITOR'
    bl_parent_id = "IMAGE_PT_realfusion"

    def editor_image(self, context):
        return getattr(context.space_data, "image", None)


class IMAGE_PT_realfusion_jobs(RealFusionJobsPanel, bpy.types.Panel):
    bl_space_type = 'IMAGE_EDITOR'
    bl_parent_id = "IMAGE_PT_realfusion"


classes = (
    REALFUSION_UL_jobs,
    VIEW3D_PT_realfusion,
    VIEW3D_PT_realfusion_advanced,
    VIEW3D_PT_realfusion_run,
    VIEW3D_PT_realfusion_jobs,
    IMAGE_PT_realfusion,
    IMAGE_PT_realfusion_advanced,
    IMAGE_PT_realfusion_run,
    IMAGE_PT_realfusion_jobs,
)

register, unregister = bpy.utils.register_classes_factory(classes)
