"""Reconstruct through the add-on against a real engine server, inside Blender (the bpy module).

    python e2e_reconstruct.py ENGINE_URL PHOTO.png REPORT.json OVERRIDES.json ENGINE_DATA_DIR

What a user does: enable the add-on, pick the photo, press Reconstruct, wait. Background
bpy fires no timers, so the Reconstruct operator's tick (`poll_job_once`) is called in a
loop with sleeps. The report says what came into the scene and how well the new camera's
view of the mesh covers the object's mask in the engine's reference view.
"""

import json
import sys
import time

import bpy

from bpy_helpers import drive, enable_addon, image_alpha_mask, iou, scene_state, silhouette


def reference_silhouette(scene, camera_path: str, meshes, size: int = 64):
    """The meshes seen through camera.json's camera as the engine framed it (square, no photo framing)."""
    from realfusion_blender import importer

    spec = importer.read_camera(camera_path)
    collection = bpy.data.collections.new("reference view")
    saved = (scene.camera, scene.render.resolution_x, scene.render.resolution_y)
    try:
        camera = importer.setup_camera(scene, collection, spec, "reference view")
        return silhouette(scene, camera, meshes, size=size)
    finally:
        scene.camera = saved[0]
        scene.render.resolution_x, scene.render.resolution_y = saved[1], saved[2]
        data = camera.data
        bpy.data.objects.remove(camera)
        bpy.data.cameras.remove(data)
        bpy.data.collections.remove(collection)


def main(url: str, photo: str, report_path: str, overrides_path: str, data_dir: str) -> int:
    with open(overrides_path) as f:
        overrides = json.load(f)
    enable_addon()
    bpy.ops.wm.read_homefile(use_empty=True)
    prefs = bpy.context.preferences.addons["realfusion_blender"].preferences
    prefs.server_url = url
    prefs.engine_jobs_dir = data_dir  # the token: read from the engine's token file there (Token field empty)
    prefs.poll_interval = 200

    from realfusion_blender.operators import find_job, start_job

    scene = bpy.context.scene
    settings = scene.realfusion
    settings.image = bpy.data.images.load(photo)
    settings.preset = "fast"
    before = scene_state()
    start = time.monotonic()
    key = start_job(bpy.context, extra_overrides=overrides)
    outcome, snapshots = drive(bpy.context, key, timeout=240.0, interval=0.2)
    job = find_job(key)[1]
    report = {
        "outcome": outcome,
        "seconds": round(time.monotonic() - start, 1),
        "error": [job.error_problem, job.error_fix],
        "states": [s["state"] for s in snapshots],
        "stages": sorted({s["stage"] for s in snapshots if s["stage"]}),
        "progress": [round(s["progress"], 4) for s in snapshots],
        "previews": sum(1 for s in snapshots if s["preview"]),
        "scene_before": before,
        "scene_after": scene_state(),
        "job": {"job_id": job.job_id, "state": job.state, "imported": job.imported,
                "collection": job.collection_name, "folder": job.folder},
    }
    if outcome == "imported":
        collection = bpy.data.collections[job.collection_name]
        meshes = [ob for ob in collection.objects if ob.type == 'MESH']
        camera = scene.camera
        mesh = meshes[0]
        texture = None
        if mesh.active_material is not None and mesh.active_material.node_tree is not None:
            images = [n.image for n in mesh.active_material.node_tree.nodes if n.type == 'TEX_IMAGE' and n.image]
            texture = list(images[0].size) if images else None
        # through the new camera, which frames the whole photo (the engine's framing of it, undone)...
        mask = image_alpha_mask(photo, size=64)
        seen = silhouette(scene, camera, meshes, size=64)
        # ...and through the engine's own square reference camera (camera.json as it is), to compare
        # with the engine's view of its mesh
        reference = reference_silhouette(scene, job.camera_path, meshes)
        report.update({
            "objects": sorted((ob.name, ob.type) for ob in collection.objects),
            "mesh_faces": len(mesh.data.polygons),
            "texture_size": texture,
            "vertex_colors": len(mesh.data.color_attributes),
            "selected_active": bpy.context.view_layer.objects.active == mesh and mesh.select_get(),
            "camera": {"name": camera.name, "lens": camera.data.lens, "sensor_width": camera.data.sensor_width,
                       "location": list(camera.matrix_world.translation),
                       "in_collection": camera.name in collection.objects,
                       "background": bool(camera.data.background_images)
                       and camera.data.background_images[0].image is not None},
            "resolution": [scene.render.resolution_x, scene.render.resolution_y],
            "mask_fraction": float(mask.mean()),
            "seen_fraction": float(seen.mean()),
            "iou": iou(mask, seen),
            "silhouette": ["".join("1" if v else "0" for v in row) for row in reference],
            "photo_background": camera.data.background_images[0].image == settings.image
            if camera.data.background_images else False,
        })
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
