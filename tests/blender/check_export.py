"""Import exported GLBs with Blender's own glTF importer and report what came in (runs inside bpy).

    python check_export.py CASES.json REPORT.json

CASES.json is a list of {"glb", "camera_json", "mask_npy"}; for each, after File > New: the
imported meshes and cameras, whether the material's Base Color comes from an image texture,
the object's box, how far the GLB's camera and a camera built from camera.json (location,
Euler rotation, lens, sensor) are from camera.json's matrix and from the ideal projection,
and the IoU of the mesh's silhouette seen through each camera with the reference mask.
"""

import json
import math
import sys

import bpy
import numpy as np

from bpy_helpers import iou, reset_scene, silhouette


def base_color_source(ob):
    """The node feeding the material's Base Color (an image texture, a color attribute, ...), or None."""
    material = ob.active_material
    if material is None or not material.use_nodes:
        return None
    for node in material.node_tree.nodes:
        if node.type == 'BSDF_PRINCIPLED':
            links = node.inputs["Base Color"].links
            return links[0].from_node if links else None
    return None


def camera_from_json(scene, spec):
    data = bpy.data.cameras.new("from_camera_json")
    data.lens = spec["lens_mm"]
    data.sensor_width = spec["sensor_width_mm"]
    data.sensor_fit = spec["sensor_fit"]
    camera = bpy.data.objects.new("from_camera_json", data)
    scene.collection.objects.link(camera)
    camera.location = spec["location"]
    camera.rotation_mode = 'XYZ'
    camera.rotation_euler = spec["rotation_euler_xyz"]
    return camera


def projection_error(camera, spec) -> float:
    """Largest difference between Blender's projection for `camera` and the ideal one for fovy/aspect."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    width, height = spec["width"], spec["height"]
    actual = np.array(camera.calc_matrix_camera(depsgraph, x=width, y=height))
    focal = 1.0 / math.tan(0.5 * spec["fovy_rad"])
    ideal = {(0, 0): focal * height / width, (1, 1): focal, (0, 2): 0.0, (1, 2): 0.0}
    return max(abs(actual[i, j] - value) for (i, j), value in ideal.items())


def check(case):
    reset_scene()
    scene = bpy.context.scene
    before = set(bpy.data.objects)
    bpy.ops.import_scene.gltf(filepath=case["glb"])
    new = [ob for ob in bpy.data.objects if ob not in before]
    meshes = [ob for ob in new if ob.type == 'MESH']
    cameras = [ob for ob in new if ob.type == 'CAMERA']
    with open(case["camera_json"]) as f:
        spec = json.load(f)
    mask = np.load(case["mask_npy"])
    scene.render.resolution_x, scene.render.resolution_y = spec["width"], spec["height"]
    scene.render.resolution_percentage = 100
    report = {"meshes": len(meshes), "cameras": len(cameras), "names": sorted(ob.name for ob in new)}
    if not meshes or not cameras:
        return report
    mesh, glb_camera = meshes[0], cameras[0]
    bpy.context.view_layer.update()
    corners = np.array([mesh.matrix_world @ v.co for v in mesh.data.vertices])
    source = base_color_source(mesh)
    image = source.image if source is not None and source.type == 'TEX_IMAGE' else None
    from_json = camera_from_json(scene, spec)
    bpy.context.view_layer.update()
    expected = np.array(spec["matrix_world"])
    report.update({
        "vertices": len(mesh.data.vertices),
        "faces": len(mesh.data.polygons),
        "uv_layers": len(mesh.data.uv_layers),
        "base_color": source.type if source is not None else None,
        "texture_size": list(image.size) if image is not None else None,
        "box_min": corners.min(0).tolist(),
        "box_max": corners.max(0).tolist(),
        "glb_camera_matrix_error": float(np.abs(np.array(glb_camera.matrix_world) - expected).max()),
        "json_camera_matrix_error": float(np.abs(np.array(from_json.matrix_world) - expected).max()),
        "glb_camera_projection_error": projection_error(glb_camera, spec),
        "json_camera_projection_error": projection_error(from_json, spec),
        "glb_camera_iou": iou(silhouette(scene, glb_camera, meshes, mask.shape[0]), mask),
        "json_camera_iou": iou(silhouette(scene, from_json, meshes, mask.shape[0]), mask),
    })
    return report


def main(cases_path: str, report_path: str) -> int:
    with open(cases_path) as f:
        cases = json.load(f)
    with open(report_path, "w") as f:
        json.dump([check(case) for case in cases], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
