# SPDX-License-Identifier: GPL-3.0-or-later
"""RealFusion for Blender: one photo in, a textured mesh and the camera that took the photo out.

The reconstruction runs in the RealFusion engine (`realfusion serve`, its own Python with
torch); this add-on only talks to it over HTTP on loopback, so Blender's Python needs
nothing beyond the standard library. Blender 4.2+ installs it as an extension (metadata:
the repository's blender_manifest.toml, which scripts/build_extension puts into the zip);
Blender 3.6 to 4.1 load it as a legacy add-on, described by bl_info below.
"""

bl_info = {
    "name": "RealFusion",
    "author": "RealFusion for Blender developers",
    "version": (0, 1, 0),
    "blender": (3, 6, 0),
    "location": "3D Viewport > Sidebar (N) > RealFusion",
    "description": "Turn one photo into a textured mesh with the camera that took it",
    "category": "Import-Export",
}

if "bpy" in locals():  # Reload Scripts: reload the submodules in dependency order
    import importlib

    for _module in (client, messages, jobs, engine_process, properties, records, previews,  # noqa: F821
                    preferences, importer, operators, panels):  # noqa: F821
        importlib.reload(_module)

import time

import bpy

from . import (client, engine_process, importer, jobs, messages, operators, panels, preferences,  # noqa: F401
               previews, properties, records)

MODULES = (properties, preferences, operators, panels)
HEALTH_EVERY_S = 5.0
HEALTH_POLL_S = 0.2  # while a check is under way
HEALTH_UNSEEN_S = 30.0  # checks stop while no panel has drawn the engine's line for this long
_last_health = [None]


def health_tick():
    """Every few seconds, ask the engine's health (in a follower process) and redraw the panels when it
    changed; while a check is under way, look for its answer often."""
    health = engine_process.HEALTH
    try:
        if health.check is None:
            if time.monotonic() - health.shown > HEALTH_UNSEEN_S:
                return HEALTH_EVERY_S  # no panel shows it: no process is started for it
            health.refresh_async(preferences.make_client(bpy.context, timeout=2.0))
            return HEALTH_POLL_S
        if not health.collect():
            return HEALTH_POLL_S
        summary = health.summary()
        if summary != _last_health[0]:
            _last_health[0] = summary
            operators.tag_redraw()
    except Exception as exc:  # noqa: BLE001 - a timer that raises is unregistered for good
        print(f"RealFusion: engine health check failed: {exc}")
    return HEALTH_EVERY_S


@bpy.app.handlers.persistent
def on_load_pre(*_args):
    """A file is being closed: stop following its jobs here (the engine goes on; reopening offers Fetch Result)."""
    jobs.detach_all()
    previews.clear()


@bpy.app.handlers.persistent
def on_load_post(*_args):
    """The opened file's job list is now the one kept outside undo."""
    records.rebuild()


@bpy.app.handlers.persistent
def on_undo_redo(*_args):
    """An undo or redo restored the scene without the jobs added since: put them back (records.py)."""
    if records.restore():
        operators.tag_redraw()


@bpy.app.handlers.persistent
def on_save_pre(filepath=None, *_args):
    """Saved at last: results in the temporary folder move next to the .blend (Blender 4.x says where the
    file goes before it is written; 3.x only after, see on_save_post)."""
    if isinstance(filepath, str) and filepath:
        operators.relocate_results(filepath)


@bpy.app.handlers.persistent
def on_save_post(*_args):
    operators.relocate_results(bpy.data.filepath)


HANDLERS = (("load_pre", on_load_pre), ("load_post", on_load_post), ("undo_post", on_undo_redo),
            ("redo_post", on_undo_redo), ("save_pre", on_save_pre), ("save_post", on_save_post))


def register():
    for module in MODULES:
        module.register()
    for name, handler in HANDLERS:
        getattr(bpy.app.handlers, name).append(handler)
    if not bpy.app.timers.is_registered(health_tick):
        bpy.app.timers.register(health_tick, first_interval=1.0, persistent=True)
    try:
        records.rebuild()  # enabled in an open file with jobs
    except AttributeError:  # Blender is starting: no file data yet (load_post follows)
        pass


def unregister():
    if bpy.app.timers.is_registered(health_tick):
        bpy.app.timers.unregister(health_tick)
    for name, handler in HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if handler in handlers:
            handlers.remove(handler)
    jobs.detach_all()
    engine_process.HEALTH.stop()
    previews.clear()
    for module in reversed(MODULES):
        module.unregister()
