# SPDX-License-Identifier: GPL-3.0-or-later
"""What the engine says, in the add-on's words: where a Blender user fixes it, and which photo.

The engine's messages are written for its own command line (curl, `--model`,
`huggingface-cli`, its job folder's `input.png`). In Blender the same problems are fixed in
the add-on's preferences and concern the user's own file; no `bpy` here.
"""

from __future__ import annotations

import re

PREFERENCES = "Edit > Preferences > Add-ons > RealFusion"
TOKEN_FIX = (f"Set Token (or Engine Data Folder, where the engine keeps its token file) in the add-on's "
             f"preferences ({PREFERENCES}), or press Engine Settings below.")
MODEL_FIX = (f"Set Model in the add-on's preferences ({PREFERENCES}) to a Stable Diffusion folder on this "
             "computer (with unet/, vae/, text_encoder/, tokenizer/), or leave it empty for the engine's default.")

STAGE_LABELS = {
    "matting": "Cutting out the object",
    "prior": "Loading the diffusion model",
    "textual_inversion": "Learning the object's token",
    "fit": "Fitting the 3D shape",
    "turntable": "Rendering the turntable",
    "export": "Exporting the mesh",
    "mesh": "Exporting the mesh",
    "done": "Done",
}
# States worth a Resume: the engine goes on from the last checkpoint and the cause may be gone
# (a stop, a cancel, a lost engine, out of memory). Other failures would just happen again.
RECOVERABLE_KINDS = ("offline", "resource")
_RESOURCE_WORDS = ("out of memory", "disk is full", "no space", "interrupted", "stopped", "restart")
_INPUT_PATH = re.compile(r"(?:[A-Za-z]:)?[^\s'\"]*[\\/]jobs[\\/][^\s'\"\\/]+[\\/]input\.(?:png|jpg|jpeg)")
# the engine's missing / unloadable Stable Diffusion (not rembg's U2-Net, whose fix is the engine's own)
_MODEL_WORDS = ("huggingface-cli", "--model", "Stable Diffusion weights", "model_index.json")


def stage_label(stage: str) -> str:
    if not stage:
        return ""
    return STAGE_LABELS.get(stage, stage.replace("_", " ").capitalize())


def for_user(error: dict | None, photo: str = "") -> dict | None:
    """{"problem", "fix", "kind"} from the engine or the client, reworded for the add-on's user.

    photo: the user's file name, which replaces the engine's own copy of it (jobs/<id>/input.png)."""
    if not error:
        return error
    problem, fix, kind = str(error.get("problem", "")), str(error.get("fix", "")), str(error.get("kind", ""))
    if photo:
        problem, fix = _INPUT_PATH.sub(photo, problem), _INPUT_PATH.sub(photo, fix)
    if kind == "auth" or "bearer token" in problem.lower():
        kind, fix = "auth", TOKEN_FIX
    elif any(word in (problem + " " + fix) for word in _MODEL_WORDS):
        kind, fix = "model", MODEL_FIX
    elif kind in ("engine", "") and any(word in (problem + " " + fix).lower() for word in _RESOURCE_WORDS):
        kind = "resource"
    return {"problem": problem, "fix": fix, "kind": kind or "engine"}


def recoverable(state: str, kind: str) -> bool:
    """Whether Resume can help: a cancelled or interrupted job, or a failure whose cause may pass."""
    if state in ("cancelled", "interrupted"):
        return True
    return state == "failed" and kind in RECOVERABLE_KINDS
