# SPDX-License-Identifier: GPL-3.0-or-later
"""The job list, kept outside undo: one undo takes back an import, never a job.

The scene's `realfusion.jobs` is what the panel's list draws and what the .blend saves (so
a job closed mid-run is followed again next time). But scene data is undo-tracked and
starting a job, or its progress, is no undo step: an undo restores the scene as it was
before, without the job. So every change to a job is also written here, in plain Python
(no `bpy` data), and `restore` (an undo_post / redo_post handler) writes the list back;
whether a job counts as imported then follows what the undo left in the file: its
collection.
"""

from __future__ import annotations

import bpy

# job key -> (scene name, {property: value}); this Blender session's jobs of the open file
_RECORDS: dict[str, tuple[str, dict]] = {}
_SKIP = {"rna_type"}
IMPORT_FIELDS = ("imported", "collection_name", "camera_name", "hidden")  # undo-tracked: the file decides


def _fields(job) -> dict:
    return {p.identifier: getattr(job, p.identifier) for p in job.bl_rna.properties if p.identifier not in _SKIP}


def remember(scene, job) -> None:
    """Keep a copy of this job's fields (call after every change on the main thread)."""
    _RECORDS[job.key] = (scene.name, _fields(job))


def forget(key: str) -> None:
    _RECORDS.pop(key, None)


def rebuild() -> None:
    """The open file's jobs become the records (after a file is loaded)."""
    _RECORDS.clear()
    for scene in bpy.data.scenes:
        settings = getattr(scene, "realfusion", None)
        for job in settings.jobs if settings is not None else ():
            remember(scene, job)


def restore() -> list[str]:
    """Put every recorded job back into its scene's list, in the order they were added. Returns the keys
    that an undo or redo had taken away.

    The job's own fields (state, progress, files...) come from the record: the engine's progress is no
    undo step. Whether it is imported is what the undo or redo left in the file: an undo of the import
    leaves no collection (Import is offered again), a redo brings it back with the job as it was then."""
    restored = []
    for key, (scene_name, fields) in list(_RECORDS.items()):
        scene = bpy.data.scenes.get(scene_name)
        if scene is None or getattr(scene, "realfusion", None) is None:
            continue
        settings = scene.realfusion
        job = settings.job(key)
        if job is None:
            job = settings.jobs.add()
            restored.append(key)
        for name, value in fields.items():
            if name not in IMPORT_FIELDS and getattr(job, name) != value:
                setattr(job, name, value)
        if not (job.imported and job.collection_name in bpy.data.collections):
            job.imported = False
            job.collection_name = job.camera_name = job.hidden = ""
        _RECORDS[key] = (scene_name, _fields(job))
    _reorder()
    return restored


def _reorder() -> None:
    """Jobs in the order they were added (a job put back by restore lands at the list's end)."""
    order = {key: index for index, key in enumerate(_RECORDS)}
    for scene in bpy.data.scenes:
        settings = getattr(scene, "realfusion", None)
        if settings is None:
            continue
        current = [job.key for job in settings.jobs]
        wanted = sorted(current, key=lambda k: (order.get(k, len(order)), current.index(k)))
        for target, key in enumerate(wanted):
            index = current.index(key)
            if index != target:
                settings.jobs.move(index, target)
                current.insert(target, current.pop(index))
        settings.active_job = min(settings.active_job, max(len(settings.jobs) - 1, 0))


def keys() -> list[str]:
    return list(_RECORDS)
