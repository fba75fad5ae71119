# SPDX-License-Identifier: GPL-3.0-or-later
"""The RealFusion sidebar (N panel) in the 3D Viewport and the Image Editor."""

from __future__ import annotations

import textwrap

import bpy

from . import engine_process, preferences
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
RESUMABLE = ("interrupted", "cancelled", "failed")  # the engine goes on from the last checkpoint


def format_eta(seconds: float) -> str:
    if seconds < 0:
        return ""
    if seconds < 90:
        return f"{max(1, round(seconds))} s left"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min left"
    return f"{seconds / 3600:.1f} h left"


def state_text(job) -> str:
    if job.imported:
        return "Imported"
    if job.state == "running":
        return f"{round(job.progress * 100)}%"
    if job.state == "queued" and job.queue_position > 0:
        return f"Queued (#{job.queue_position + 1})"
    return job.state.capitalize()


def progress_text(job) -> str:
    parts = [job.message or job.stage or job.state.capitalize(), f"{round(job.progress * 100)}%"]
    eta = format_eta(job.eta) if job.state == "running" else ""
    if eta:
        parts.append(eta)
    return " · ".join(parts)


def wrapped_labels(layout, text: str, context=None, icon='NONE') -> None:
    """A long message as several labels, wrapped to the sidebar's width."""
    region = getattr(context, "region", None) if context is not None else None
    width = getattr(region, "width", 0) or 280
    chars = max(20, int(width / 7))
    for index, line in enumerate(textwrap.wrap(text, chars) or [""]):
        layout.label(text=line, icon=icon if index == 0 else 'BLANK1' if icon != 'NONE' else 'NONE')


def draw_error(layout, context, problem: str, fix: str, kind: str, dismiss: bool = False) -> None:
    box = layout.box()
    box.alert = True
    col = box.column(align=True)
    wrapped_labels(col, problem, context, icon='ERROR')
    if fix:
        col.separator()
        wrapped_labels(col, fix, context, icon='INFO')
    if kind == "offline":
        row = box.row(align=True)
        prefs = preferences.get(context)
        if prefs is not None and prefs.engine_python:
            row.operator("realfusion.engine_start", icon='PLAY')
        else:
            row.operator("realfusion.open_preferences", icon='PREFERENCES')
        row.operator("realfusion.engine_status", text="Retry", icon='FILE_REFRESH')
    elif kind == "auth":
        box.operator("realfusion.open_preferences", icon='PREFERENCES')
    if dismiss:
        box.operator("realfusion.dismiss_error", icon='X')


def draw_engine(layout, context) -> None:
    health = engine_process.HEALTH
    row = layout.row(align=True)
    icon = 'CHECKMARK' if health.info else 'ERROR' if health.error is not None else 'QUESTION'
    row.label(text=health.summary(), icon=icon)
    if health.info is None and not engine_process.PROCESS.running:
        prefs = preferences.get(context)
        if prefs is not None and prefs.engine_python:
            row.operator("realfusion.engine_start", text="", icon='PLAY')
    row.operator("realfusion.engine_status", text="", icon='FILE_REFRESH')


def draw_photo(layout, settings) -> None:
    layout.row().prop(settings, "source", expand=True)
    if settings.source == 'IMAGE':
        layout.template_ID(settings, "image", open="image.open")
        if settings.image is not None:
            layout.template_icon(icon_value=layout.icon(settings.image), scale=6.0)
    else:
        layout.prop(settings, "filepath", text="")


def draw_options(layout, settings) -> None:
    col = layout.column()
    col.use_property_split = True
    col.use_property_decorate = False
    col.prop(settings, "preset")
    col.prop(settings, "method")
    col.prop(settings, "seed")


def draw_job(layout, context, job) -> None:
    """The selected job: progress, stage, live preview, and what can be done with it."""
    col = layout.column()
    col.label(text=job.name, icon=STATE_ICONS.get(job.state, 'QUESTION'))
    if job.state in ACTIVE_STATES or job.state == "done":
        col.progress(factor=job.progress, type='BAR', text=progress_text(job))
    elif job.message:
        wrapped_labels(col, job.message, context)
    if job.state == "running" and job.stage:
        col.label(text=f"Stage: {job.stage}" + (f" ({job.step}/{job.total})" if job.total else ""))
    if job.preview is not None:
        col.template_icon(icon_value=layout.icon(job.preview), scale=8.0)
    if job.error_problem:
        draw_error(col, context, job.error_problem, job.error_fix, job.error_kind)

    row = col.row(align=True)
    following = job.key in WORKERS and WORKERS[job.key].is_alive()
    if job.state in ACTIVE_STATES:
        if not following and job.job_id:
            row.operator("realfusion.follow", icon='FILE_REFRESH').key = job.key
        row.operator("realfusion.cancel", icon='CANCEL').key = job.key
    elif job.job_id and (job.state == "unreachable" or job.state == "failed" and job.error_kind != "engine"):
        # we lost track of it (engine gone, a download failed): ask the engine again
        row.operator("realfusion.follow", text="Check Again", icon='FILE_REFRESH').key = job.key
    elif job.state in RESUMABLE and job.job_id:
        op = row.operator("realfusion.follow", text="Resume", icon='PLAY')
        op.key, op.resume = job.key, True
    elif job.state == "done" and not job.imported:
        if job.glb_path:
            row.operator("realfusion.import_result", text="Import", icon='IMPORT').key = job.key
        else:
            row.operator("realfusion.follow", icon='IMPORT').key = job.key
    if not following:
        row.operator("realfusion.remove_job", text="", icon='X').key = job.key


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
        draw_options(layout, settings)
        row = layout.row()
        row.scale_y = 1.5
        op = row.operator("realfusion.reconstruct", icon='MESH_MONKEY')
        if image is not None:
            op.image_name = image.name

    def editor_image(self, context):
        return None


class RealFusionAdvancedPanel(RealFusionPanelMixin):
    bl_label = "Advanced"
    bl_options = {'DEFAULT_CLOSED'}

    def draw(self, context):
        settings = context.scene.realfusion
        col = self.layout.column()
        col.use_property_split = True
        col.use_property_decorate = False
        col.prop(settings, "steps")
        col.prop(settings, "mesh_resolution")
        col.prop(settings, "texture_size")
        col.prop(settings, "use_background")


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


class IMAGE_PT_realfusion_jobs(RealFusionJobsPanel, bpy.types.Panel):
    bl_space_type = 'IMAGE_EDITOR'
    bl_parent_id = "IMAGE_PT_realfusion"


classes = (
    REALFUSION_UL_jobs,
    VIEW3D_PT_realfusion,
    VIEW3D_PT_realfusion_advanced,
    VIEW3D_PT_realfusion_jobs,
    IMAGE_PT_realfusion,
    IMAGE_PT_realfusion_advanced,
    IMAGE_PT_realfusion_jobs,
)

register, unregister = bpy.utils.register_classes_factory(classes)
