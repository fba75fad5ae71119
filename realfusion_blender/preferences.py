# SPDX-License-Identifier: GPL-3.0-or-later
"""Add-on preferences: where the engine is, how to start it, where results go."""

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from . import engine_process
from .client import DEFAULT_URL, EngineClient, read_token_file
from .properties import PRESET_ITEMS

ADDON_ID = __package__


class RealFusionPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    server_url: StringProperty(name="Engine URL", default=DEFAULT_URL,
                               description="Address of `realfusion serve` (it listens on loopback by default)")
    token: StringProperty(name="Token", subtype='PASSWORD', default="",
                          description="The engine's bearer token; empty: read it from the token file")
    token_file: StringProperty(name="Token File", subtype='FILE_PATH', default="",
                               description="File holding the engine's token (empty: `token` in the engine's data "
                                           "folder, which `realfusion serve` writes on its first start)")
    model: StringProperty(name="Model", default="",
                          description="Stable Diffusion hub id or local folder (empty: the engine's default)")
    default_preset: EnumProperty(name="Default Preset", items=PRESET_ITEMS, default="standard")
    output_dir: StringProperty(
        name="Output Folder", subtype='DIR_PATH', default="//realfusion",
        description="Where results are downloaded; // means next to the .blend (a temporary folder while the "
                    "file is unsaved)")
    engine_python: StringProperty(
        name="Engine Environment", subtype='FILE_PATH', default="",
        description="The engine's Python (…/bin/python), its `realfusion` command, or the virtual environment's "
                    "folder")
    engine_device: EnumProperty(name="Device", items=(("auto", "Auto", "CUDA when there is a GPU"),
                                                       ("cuda", "CUDA", "The GPU"), ("cpu", "CPU", "Slow; for tests")),
                                default="auto")
    engine_jobs_dir: StringProperty(name="Engine Data Folder", subtype='DIR_PATH', default="",
                                    description="Where the engine keeps its jobs and its token file (empty: its "
                                                "default, ~/.local/share/realfusion/jobs)")
    poll_interval: IntProperty(name="Poll Interval (ms)", min=100, max=10000, default=500)

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        col = layout.column(heading="Engine")
        col.prop(self, "server_url")
        col.prop(self, "token")
        col.prop(self, "token_file")
        col.prop(self, "model")
        col.prop(self, "default_preset")
        col.prop(self, "output_dir")
        col.prop(self, "poll_interval")

        box = layout.box()
        box.label(text="Local Engine", icon='CONSOLE')
        col = box.column()
        col.prop(self, "engine_python")
        col.prop(self, "engine_device")
        col.prop(self, "engine_jobs_dir")
        row = box.row(align=True)
        row.operator("realfusion.engine_start", icon='PLAY')
        row.operator("realfusion.engine_stop", icon='SNAP_FACE')
        row.operator("realfusion.engine_status", icon='INFO')
        status = engine_process.describe()
        for line in status.splitlines():
            box.label(text=line)


def get(context=None):
    """The add-on's preferences, or None when it is not enabled as an add-on (then defaults apply)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon else None


def make_client(context=None, timeout: float = 10.0) -> EngineClient:
    prefs = get(context)
    if prefs is None:
        return EngineClient(DEFAULT_URL, token=read_token_file(engine_process.token_path()), timeout=timeout)
    return EngineClient(prefs.server_url, token=token_for(prefs), timeout=timeout)


def token_for(prefs) -> str:
    """The Token field, else the token file: the one set in the preferences, else the engine's data folder's."""
    if prefs.token:
        return prefs.token
    if prefs.token_file:
        return read_token_file(bpy.path.abspath(prefs.token_file))
    data_dir = bpy.path.abspath(prefs.engine_jobs_dir) if prefs.engine_jobs_dir else ""
    return read_token_file(engine_process.token_path(data_dir))


classes = (RealFusionPreferences,)

register, unregister = bpy.utils.register_classes_factory(classes)
