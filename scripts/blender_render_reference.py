"""Render a vertex-colored mesh, unlit, through a given camera with Blender (the bpy module, Cycles, CPU).

    python scripts/blender_render_reference.py MESH.ply CAMERA.json OUT.png [--samples N] [--resolution R]

Run with the Python of the bpy environment (.venv-blender); it imports only bpy, numpy and the
standard library, so it checks the engine's camera conventions against an outside renderer.
CAMERA.json holds {"c2w": 4x4 camera-to-world (Blender's conventions: Z up, the camera looks down
its local -Z with +Y up), "fovy": vertical field of view in radians, "resolution": pixels a side}.

The scene is what the project's ground-truth ray caster computes: every face shows its interpolated
vertex color (an emission-only material, no lights, no bounces), the background is transparent
(alpha = coverage), the pixel filter is a one-pixel box (the ray caster's supersampling is a box
filter too), and colors leave as they came in. The ray caster interpolates the byte values
themselves (value / 255) across a triangle, while Blender, reading PLY colors as sRGB, would
linearize each vertex first and interpolate in linear light (the mug's long gradient faces then
differ by ~28 dB PSNR). So the colors are imported as they are (LINEAR: no decoding), interpolated
as stored, decoded with the exact sRGB curve in the shader, and encoded back by the 'Standard'
view transform (sRGB display, no look, no dither): a pixel carries the interpolated byte value.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import bpy
from mathutils import Matrix


def srgb_to_linear(nodes, links, color):
    """Shader nodes for the exact sRGB decoding curve, channel by channel; returns the linear color socket."""
    separate, combine = nodes.new("ShaderNodeSeparateColor"), nodes.new("ShaderNodeCombineColor")
    links.new(color, separate.inputs["Color"])

    def math(operation, a, b):
        node = nodes.new("ShaderNodeMath")
        node.operation = operation
        for socket, value in zip(node.inputs, (a, b)):
            if isinstance(value, float):
                socket.default_value = value
            else:
                links.new(value, socket)
        return node.outputs[0]

    for index in range(3):
        value = separate.outputs[index]
        low = math("DIVIDE", value, 12.92)
        high = math("POWER", math("DIVIDE", math("ADD", value, 0.055), 1.055), 2.4)
        is_high = math("GREATER_THAN", value, 0.04045)
        blend = math("ADD", math("MULTIPLY", high, is_high), math("MULTIPLY", low, math("SUBTRACT", 1.0, is_high)))
        links.new(blend, combine.inputs[index])
    return combine.outputs["Color"]


def build_scene(mesh_path: Path, camera: dict, samples: int, resolution: int) -> bpy.types.Scene:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene

    bpy.ops.wm.ply_import(filepath=str(mesh_path), forward_axis="Y", up_axis="Z", merge_verts=False,
                          import_colors="LINEAR")
    obj = bpy.context.selected_objects[0]
    attributes = obj.data.color_attributes
    if not len(attributes):
        raise RuntimeError(f"{mesh_path} has no vertex colors")
    color_name = attributes[0].name

    material = bpy.data.materials.new("vertex_color_emission")
    if material.node_tree is None:  # Blender < 5: node trees are opt-in
        material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    nodes.clear()
    attribute = nodes.new("ShaderNodeAttribute")
    attribute.attribute_type = "GEOMETRY"
    attribute.attribute_name = color_name
    emission = nodes.new("ShaderNodeEmission")
    emission.inputs["Strength"].default_value = 1.0
    output = nodes.new("ShaderNodeOutputMaterial")
    links.new(srgb_to_linear(nodes, links, attribute.outputs["Color"]), emission.inputs["Color"])
    links.new(emission.outputs["Emission"], output.inputs["Surface"])
    obj.data.materials.clear()
    obj.data.materials.append(material)

    camera_data = bpy.data.cameras.new("reference")
    camera_data.type = "PERSP"
    camera_data.sensor_fit = "VERTICAL"
    camera_data.angle_y = float(camera["fovy"])
    camera_data.shift_x = camera_data.shift_y = 0.0
    camera_data.clip_start, camera_data.clip_end = 0.01, 100.0
    camera_object = bpy.data.objects.new("reference", camera_data)
    scene.collection.objects.link(camera_object)
    camera_object.matrix_world = Matrix(camera["c2w"])
    scene.camera = camera_object

    world = bpy.data.worlds.new("black")
    if world.node_tree is None:
        world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.0
    scene.world = world

    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_adaptive_sampling = False
    scene.cycles.use_denoising = False
    scene.cycles.seed = 0
    scene.cycles.max_bounces = 0
    scene.cycles.pixel_filter_type = "BOX"
    scene.cycles.filter_width = 1.0
    scene.render.film_transparent = True
    scene.render.resolution_x = scene.render.resolution_y = resolution
    scene.render.resolution_percentage = 100
    scene.render.pixel_aspect_x = scene.render.pixel_aspect_y = 1.0
    scene.render.dither_intensity = 0.0
    scene.render.use_compositing = False
    scene.render.use_sequencer = False
    for stamp in [name for name in dir(scene.render) if name.startswith("use_stamp")]:
        setattr(scene.render, stamp, False)

    scene.display_settings.display_device = "sRGB"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    scene.view_settings.use_curve_mapping = False

    image = scene.render.image_settings
    image.file_format = "PNG"
    image.color_mode = "RGBA"
    image.color_depth = "8"
    image.compression = 100
    return scene


def strip_png_metadata(path: Path) -> None:
    """Keep only the chunks that make the image: no render date or timings, so regenerating changes no byte."""
    data = path.read_bytes()
    signature, position, kept = data[:8], 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        chunk = data[position:position + 12 + length]
        if chunk[4:8] in (b"IHDR", b"PLTE", b"tRNS", b"sRGB", b"gAMA", b"IDAT", b"IEND"):
            kept.append(chunk)
        position += 12 + length
    path.write_bytes(signature + b"".join(kept))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mesh", type=Path)
    parser.add_argument("camera", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=None, help="default: the camera's resolution")
    args = parser.parse_args(argv)

    camera = json.loads(args.camera.read_text())
    resolution = args.resolution or int(camera["resolution"])
    scene = build_scene(args.mesh, camera, args.samples, resolution)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    scene.render.filepath = str(args.output)
    start = time.perf_counter()
    bpy.ops.render.render(write_still=True)
    strip_png_metadata(args.output)
    print(json.dumps({"output": str(args.output), "render_s": round(time.perf_counter() - start, 3),
                      "samples": args.samples, "resolution": resolution}))


if __name__ == "__main__":
    main(sys.argv[1:])
