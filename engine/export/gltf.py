"""Writing the mesh: binary glTF 2.0 (one .glb with the texture and the reference camera) or OBJ + MTL + PNG.

The GLB container is small enough to write by hand: a 12-byte header, a JSON chunk
and a BIN chunk, each padded to 4 bytes. glTF is Y up where the engine (Blender) is
Z up: points and directions go (x, y, z) -> (x, z, -y), and so does the camera node,
so Blender's importer, which converts back, lands everything where the engine had it.
OBJ files are read as Y up by every importer too, so they get the same conversion.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .. import __version__
from .placement import clip_end, clip_start

Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

GLB_MAGIC, GLB_VERSION = 0x46546C67, 2
CHUNK_JSON, CHUNK_BIN = 0x4E4F534A, 0x004E4942
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UNSIGNED_SHORT, UNSIGNED_INT = 5126, 5123, 5125
LINEAR, LINEAR_MIPMAP_LINEAR, CLAMP_TO_EDGE = 9729, 9987, 33071
TRIANGLES = 4
GENERATOR = f"RealFusion for Blender {__version__}"


@dataclass
class MeshData:
    """A mesh ready to write, in Blender world coordinates (Z up, meters)."""

    vertices: np.ndarray  # [V,3]
    normals: np.ndarray  # [V,3] unit
    faces: np.ndarray  # [F,3], counter-clockwise seen from outside
    uv: np.ndarray | None = None  # [V,2] glTF convention: (0, 0) is the image's top-left
    colors: np.ndarray | None = None  # [V,3] in [0,1]
    texture: np.ndarray | None = None  # [H,W,3] uint8


@dataclass
class CameraData:
    c2w: np.ndarray  # [4,4] Blender world
    fovy: float  # radians
    aspect: float  # width / height


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _y_up(points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ Z_UP_TO_Y_UP.T


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Unit vectors in float32 (the validator checks their length), any zero one replaced by +Y."""
    v = np.asarray(vectors, np.float64)
    length = np.linalg.norm(v, axis=-1, keepdims=True)
    v = np.where(length > 1e-12, v / np.maximum(length, 1e-12), [0.0, 1.0, 0.0])
    return v.astype(np.float32)


def quaternion_xyzw(rotation: np.ndarray) -> list[float]:
    """Unit quaternion [x, y, z, w] of a 3x3 rotation matrix (Shepperd's method)."""
    m = np.asarray(rotation, np.float64)
    trace = np.trace(m)
    if trace > 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * math.sqrt(max(1.0 + m[i, i] - m[j, j] - m[k, k], 1e-12))
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i], q[j], q[k] = 0.25 * s, (m[j, i] + m[i, j]) / s, (m[k, i] + m[i, k]) / s
    q = np.array(q)
    return (q / np.linalg.norm(q)).tolist()


class _Buffer:
    """The BIN chunk, built view by view (each aligned to 4 bytes), with the JSON entries that describe it."""

    def __init__(self):
        self.data = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def view(self, payload: bytes, target: int | None = None) -> int:
        self.data += b"\0" * (-len(self.data) % 4)
        entry = {"buffer": 0, "byteOffset": len(self.data), "byteLength": len(payload)}
        if target is not None:
            entry["target"] = target
        self.data += payload
        self.views.append(entry)
        return len(self.views) - 1

    def accessor(self, array: np.ndarray, kind: str, component: int, target: int, bounds: bool = False) -> int:
        entry = {"bufferView": self.view(array.tobytes(), target), "componentType": component,
                 "count": int(array.shape[0]), "type": kind}
        if bounds:
            entry["min"] = array.min(0).astype(np.float64).tolist()
            entry["max"] = array.max(0).astype(np.float64).tolist()
        self.accessors.append(entry)
        return len(self.accessors) - 1


def glb_bytes(mesh: MeshData, camera: CameraData | None = None, mesh_name: str = "realfusion_object",
              camera_name: str = "reference_camera") -> bytes:
    buffer = _Buffer()
    attributes = {
        "POSITION": buffer.accessor(_y_up(mesh.vertices).astype(np.float32), "VEC3", FLOAT, ARRAY_BUFFER, True),
        "NORMAL": buffer.accessor(_unit(_y_up(mesh.normals)), "VEC3", FLOAT, ARRAY_BUFFER),
    }
    material: dict = {"name": "albedo", "pbrMetallicRoughness": {"metallicFactor": 0.0, "roughnessFactor": 1.0}}
    gltf: dict = {"asset": {"version": "2.0", "generator": GENERATOR}}
    if mesh.uv is not None:
        attributes["TEXCOORD_0"] = buffer.accessor(np.asarray(mesh.uv, np.float32), "VEC2", FLOAT, ARRAY_BUFFER)
    if mesh.colors is not None:
        attributes["COLOR_0"] = buffer.accessor(np.clip(mesh.colors, 0, 1).astype(np.float32), "VEC3", FLOAT,
                                                ARRAY_BUFFER)
    index_type = (np.uint16, UNSIGNED_SHORT) if len(mesh.vertices) < 65535 else (np.uint32, UNSIGNED_INT)
    indices = buffer.accessor(np.asarray(mesh.faces).reshape(-1).astype(index_type[0]), "SCALAR", index_type[1],
                              ELEMENT_ARRAY_BUFFER)
    if mesh.texture is not None:
        image_view = buffer.view(png_bytes(mesh.texture))
        gltf["images"] = [{"name": "albedo", "bufferView": image_view, "mimeType": "image/png"}]
        gltf["samplers"] = [{"magFilter": LINEAR, "minFilter": LINEAR_MIPMAP_LINEAR,
                             "wrapS": CLAMP_TO_EDGE, "wrapT": CLAMP_TO_EDGE}]
        gltf["textures"] = [{"sampler": 0, "source": 0}]
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0, "texCoord": 0}
    gltf["materials"] = [material]
    gltf["meshes"] = [{"name": mesh_name, "primitives": [
        {"attributes": attributes, "indices": indices, "material": 0, "mode": TRIANGLES}]}]
    nodes = [{"name": mesh_name, "mesh": 0}]
    if camera is not None:
        pose = np.eye(4)
        pose[:3, :3] = Z_UP_TO_Y_UP @ np.asarray(camera.c2w)[:3, :3]
        pose[:3, 3] = Z_UP_TO_Y_UP @ np.asarray(camera.c2w)[:3, 3]
        distance = float(np.linalg.norm(pose[:3, 3]))
        gltf["cameras"] = [{"name": camera_name, "type": "perspective", "perspective": {
            "yfov": float(camera.fovy), "aspectRatio": float(camera.aspect),
            "znear": clip_start(distance), "zfar": clip_end(distance)}}]
        nodes.append({"name": camera_name, "camera": 0, "translation": pose[:3, 3].tolist(),
                      "rotation": quaternion_xyzw(pose[:3, :3])})
    gltf["nodes"] = nodes
    gltf["scenes"] = [{"name": "RealFusion", "nodes": list(range(len(nodes)))}]
    gltf["scene"] = 0
    gltf["accessors"] = buffer.accessors
    gltf["bufferViews"] = buffer.views
    buffer.data += b"\0" * (-len(buffer.data) % 4)
    gltf["buffers"] = [{"byteLength": len(buffer.data)}]

    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(buffer.data)
    return b"".join([struct.pack("<III", GLB_MAGIC, GLB_VERSION, total),
                     struct.pack("<II", len(text), CHUNK_JSON), text,
                     struct.pack("<II", len(buffer.data), CHUNK_BIN), bytes(buffer.data)])


def obj_files(mesh: MeshData, stem: str = "mesh") -> dict[str, bytes]:
    """`stem`.obj, `stem`.mtl and (textured) `stem`_albedo.png, as file name -> contents."""
    positions = _y_up(mesh.vertices)
    normals = _unit(_y_up(mesh.normals))
    lines = [f"# {GENERATOR}", f"mtllib {stem}.mtl", f"o {stem}"]
    if mesh.colors is not None:  # the common "v x y z r g b" extension (Blender, MeshLab, trimesh read it)
        lines += [f"v {p[0]:.6f} {p[1]:.6f} {p[2]:.6f} {c[0]:.4f} {c[1]:.4f} {c[2]:.4f}"
                  for p, c in zip(positions, np.clip(mesh.colors, 0, 1))]
    else:
        lines += [f"v {p[0]:.6f} {p[1]:.6f} {p[2]:.6f}" for p in positions]
    lines += [f"vn {n[0]:.5f} {n[1]:.5f} {n[2]:.5f}" for n in normals]
    faces = np.asarray(mesh.faces) + 1
    if mesh.uv is not None:
        lines += [f"vt {u:.6f} {1.0 - v:.6f}" for u, v in mesh.uv]  # OBJ's v grows upward
        lines += ["usemtl albedo"] + [f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in faces]
    else:
        lines += ["usemtl albedo"] + [f"f {a}//{a} {b}//{b} {c}//{c}" for a, b, c in faces]
    material = ["newmtl albedo", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1"]
    files = {f"{stem}.obj": ("\n".join(lines) + "\n").encode()}
    if mesh.texture is not None:
        material.append(f"map_Kd {stem}_albedo.png")
        files[f"{stem}_albedo.png"] = png_bytes(mesh.texture)
    files[f"{stem}.mtl"] = ("\n".join(material) + "\n").encode()
    return files
