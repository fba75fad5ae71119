# SPDX-License-Identifier: GPL-3.0-or-later
"""The engine's live previews as icons: loaded on the main thread, never an Image datablock.

Why not an Image: drawing an Image's icon makes Blender render its preview in a job thread
that reads the image's pixel buffer, and reloading that Image for the next preview.png
frees the buffer under that thread (the crash right after the first preview of a job). An
Image would also be undo-tracked ID data that an undo frees while the panel draws it.
Here every preview is read from its file into its own icon (`bpy.utils.previews`) at once,
on the main thread, before any draw sees it; nothing else holds its pixels. Old icons are
freed a few previews later, so a redraw already queued never meets a freed one.
"""

from __future__ import annotations

import bpy
import bpy.utils.previews

KEEP = 3  # icons kept per job: the current one and two before it
_collection = None
_shown: dict[str, list[str]] = {}  # job key -> names of its icons in the collection, oldest first
_counter = [0]


def _previews():
    global _collection
    if _collection is None:
        _collection = bpy.utils.previews.new()
    return _collection


def show(key: str, path: str) -> int:
    """Load `path` as the job's current preview (main thread only). Returns its icon id (0 if unreadable)."""
    _counter[0] += 1
    name = f"{key}-{_counter[0]}"
    collection = _previews()
    preview = collection.load(name, path, 'IMAGE', force_reload=True)
    size = tuple(preview.image_size)  # reading the size loads the pixels now, here, on this thread
    names = _shown.setdefault(key, [])
    names.append(name)
    while len(names) > KEEP:
        old = names.pop(0)
        if old in collection:
            del collection[old]
    return preview.icon_id if size[0] else 0


def icon_id(key: str) -> int:
    """The job's current preview icon, 0 when it has none (and always in background mode: no icons there)."""
    names = _shown.get(key)
    if not names or _collection is None or names[-1] not in _collection:
        return 0
    return _collection[names[-1]].icon_id


def size(key: str) -> tuple[int, int]:
    names = _shown.get(key)
    if not names or _collection is None or names[-1] not in _collection:
        return (0, 0)
    return tuple(_collection[names[-1]].image_size)


def forget(key: str) -> None:
    for name in _shown.pop(key, []):
        if _collection is not None and name in _collection:
            del _collection[name]


def clear() -> None:
    global _collection
    _shown.clear()
    if _collection is not None:
        bpy.utils.previews.remove(_collection)
        _collection = None
