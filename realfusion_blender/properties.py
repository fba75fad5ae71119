# SPDX-License-Identifier: GPL-3.0-or-later
"""Scene settings of the RealFusion panel and its list of jobs (saved with the .blend).

Jobs are saved with the file on purpose: when Blender closes mid-job the engine goes on,
and the next time the file is opened the panel offers to follow the job again and import it.
Scene data is undo-tracked, though, and adding a job is no undo step: `records.py` keeps a
copy of every job outside of it and puts the list back after each undo and redo.
"""

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty,
                       StringProperty)

PRESET_ITEMS = (
    ("fast", "Fast", "Quick look: fewer steps, lower resolution (minutes on a GPU)"),
    ("standard", "Standard", "Good quality at a fraction of the paper's time"),
    ("paper", "Paper", "The RealFusion paper's settings (slow)"),
)
METHOD_ITEMS = (
    ("realfusion", "RealFusion", "Single-image textual inversion + score distillation (Melas-Kyriazi et al. 2023)"),
    ("conrad", "ConRad", "Image-constrained radiance field: the photo's own colors on the visible surface "
                         "(Purushwalkam & Naik 2023)"),
)


class RealFusionJob(bpy.types.PropertyGroup):
    key: StringProperty(name="Key", description="This file's id of the job")
    job_id: StringProperty(name="Engine Job", description="The engine's id of the job")
    name: StringProperty(name="Name", description="The photo the job reconstructs")
    image_name: StringProperty(name="Image", description="Name of the image datablock the photo came from")
    image_path: StringProperty(name="Photo", description="File the photo came from", subtype='FILE_PATH')
    preset: StringProperty(name="Preset")
    seed: IntProperty(name="Seed")
    state: StringProperty(name="State", default="submitting")
    stage: StringProperty(name="Stage")
    message: StringProperty(name="Message")
    step: IntProperty(name="Step")
    total: IntProperty(name="Total")
    progress: FloatProperty(name="Progress", min=0.0, max=1.0, subtype='FACTOR')
    eta: FloatProperty(name="Time Left", default=-1.0, description="Seconds left (-1: not known yet)")
    queue_position: IntProperty(name="Queue Position", default=-1)
    error_problem: StringProperty(name="Problem")
    error_fix: StringProperty(name="Fix")
    error_kind: StringProperty(name="Error Kind")
    photo_filename: StringProperty(name="Photo File", description="The photo's file name, as the user knows it")
    cancel_requested: BoolProperty(name="Cancelling", description="Cancel was pressed; the engine stops soon")
    folder: StringProperty(name="Folder", subtype='DIR_PATH', description="Where the results are downloaded")
    glb_path: StringProperty(name="Mesh", subtype='FILE_PATH')
    camera_path: StringProperty(name="Camera", subtype='FILE_PATH')
    reference_path: StringProperty(name="Reference View", subtype='FILE_PATH')
    turntable_path: StringProperty(name="Turntable", subtype='FILE_PATH')
    imported: BoolProperty(name="Imported")
    collection_name: StringProperty(name="Collection")
    camera_name: StringProperty(name="Camera Object")
    hidden: StringProperty(name="Hidden Objects",
                           description="Objects hidden at import because they stood in front of the result")


class RealFusionSettings(bpy.types.PropertyGroup):
    source: EnumProperty(
        name="Source",
        items=(('IMAGE', "Image", "An image loaded in this file"),
               ('FILE', "File", "A photo on disk")),
        default='IMAGE',
    )
    image: PointerProperty(name="Image", type=bpy.types.Image, description="Photo of the object to reconstruct")
    filepath: StringProperty(name="Photo", subtype='FILE_PATH', description="Photo of the object (PNG or JPEG)")
    preset: EnumProperty(name="Preset", items=(("DEFAULT", "Default", "The preset chosen in the preferences"),)
                         + PRESET_ITEMS, default="DEFAULT")
    method: EnumProperty(name="Method", items=METHOD_ITEMS, default="realfusion")
    seed: IntProperty(name="Seed", min=0, default=0, description="Same photo + seed + preset: same result")
    initializer: StringProperty(
        name="Object Name", default="",
        description="One word naming the object (e.g. teddy, mug, chair): textual inversion starts from it. "
                    "Empty: the engine's default word")
    # Advanced: each 0 means "the preset's"; small values make a run short enough for a CPU
    steps: IntProperty(name="Fit Steps", min=0, default=0,
                       description="Field-fit iterations (0: the preset's)")
    ti_steps: IntProperty(name="Token Steps", min=0, default=0,
                          description="Textual-inversion steps that learn the object's token (0: the preset's)")
    render_size: IntProperty(name="Render Size", min=0, max=1024, default=0,
                             description="Size in pixels of the fit's renders of the reference and the random "
                                         "views (0: the preset's; 32-64 for a CPU)")
    mesh_resolution: IntProperty(name="Mesh Grid", min=0, max=1024, default=0,
                                 description="Marching-cubes grid size of the mesh (0: the engine's default)")
    texture_size: IntProperty(name="Texture", min=0, max=8192, default=0,
                              description="Baked texture width in pixels (0: the engine's default)")
    use_background: BoolProperty(name="Photo Behind Camera", default=True,
                                 description="Show your photo behind the mesh when looking through the new camera "
                                             "(placed so that it lines up with the mesh)")
    jobs: CollectionProperty(type=RealFusionJob)
    active_job: IntProperty(name="Active Job", default=0)
    # Errors that come before a job exists (no engine, unreadable photo)
    error_problem: StringProperty(name="Problem")
    error_fix: StringProperty(name="Fix")
    error_kind: StringProperty(name="Error Kind")

    def job(self, key: str):
        for job in self.jobs:
            if job.key == key:
                return job
        return None

    def set_error(self, problem: str = "", fix: str = "", kind: str = "") -> None:
        self.error_problem, self.error_fix, self.error_kind = problem, fix, kind


classes = (RealFusionJob, RealFusionSettings)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.realfusion = PointerProperty(type=RealFusionSettings)


def unregister():
    del bpy.types.Scene.realfusion
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
