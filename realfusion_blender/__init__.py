# SPDX-License-Identifier: GPL-3.0-or-later
"""RealFusion for Blender: one photo in, a textured mesh and the camera that took the photo out.

The reconstruction runs in the RealFusion engine (`realfusion serve`, its own Python with
torch); this add-on only talks to it over HTTP on loopback, so Blender's Python needs
nothing beyond the standard library. Metadata lives in blender_manifest.toml next to this file.
"""

if "bpy" in locals():  # Reload Scripts: reload the submodules in dependency order
    import importlib

    for _module in (client, jobs, engine_process, properties, preferences, importer, operators, panels):  # noqa: F821
        importlib.reload(_module)

import bpy

from . import client, engine_process, importer, jobs, operators, panels, preferences, properties  # noqa: F401

MODULES = (properties, preferences, operators, panels)
HEALTH_EVERY_S = 5.0
_last_health = [None]


def health_tick():
    """Every few seconds, refresh the engine's health in a thread and redraw the panels when it changed."""
    try:
        engine_process.HEALTH.refresh_async(preferences.make_client(bpy.context, timeout=2.0))
        summary = engine_process.HEALTH.summary()
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


def register():
    for module in MODULES:
        module.register()
    bpy.app.handlers.load_pre.append(on_load_pre)
    if not bpy.app.timers.is_registered(health_tick):
        bpy.app.timers.register(health_tick, first_interval=1.0, persistent=True)


def unregister():
    if bpy.app.timers.is_registered(health_tick):
        bpy.app.timers.unregister(health_tick)
    if on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(on_load_pre)
    jobs.detach_all()
    for module in reversed(MODULES):
        module.unregister()
