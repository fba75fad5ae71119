"""Step 1 of RealFusion: cut the object out of the photo, center it on a square, pad, resize.

The later stages see one `ReferenceImage`: a square picture of the object composited over
white (RealFusion renders and compares against a white background) plus its alpha mask.
The object is taken from the image's own alpha channel when it has one, else from rembg.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from engine.config import MattingConfig
from engine.errors import InputImageError, MissingWeightsError, OutputDirError

# A remover takes the RGB photo and returns its alpha: a PIL image ("L", or one with an
# alpha band) or an array [H, W] (uint8 0..255 or float 0..1). Tests inject fakes.
Remover = Callable[[Image.Image], Union[Image.Image, np.ndarray]]

REFERENCE_NAME = "reference.png"
MASK_NAME = "reference_mask.png"
_SOURCE_KEY = "realfusion:source"  # PNG text chunk, so load_reference knows where the alpha came from
# PNG text chunk: which square of the input photo the reference shows, {"box": [x0, y0, x1, y1] in the
# photo's pixels (y down, may reach outside it), "size": [W, H]}; the Blender add-on lines the photo up by it
_FRAMING_KEY = "realfusion:framing"
_ALPHA_MODES = ("RGBA", "LA", "La", "PA", "RGBa")
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass
class ReferenceImage:
    rgb: np.ndarray  # float32 [S,S,3] in [0,1]: the object's own color, composited over white
    mask: np.ndarray  # float32 [S,S] in [0,1]: the alpha
    content_hash: str  # sha256 of the RGBA bytes and size; keys the cached textual-inversion embedding
    source: str  # "alpha" (the input's own transparency) or "rembg"
    framing: dict | None = None  # {"box", "size"}: where in the input photo the square was cut (see _FRAMING_KEY)

    def rgba_uint8(self) -> np.ndarray:
        """[S,S,4] straight (not premultiplied) color and alpha, as written to reference.png."""
        alpha = self.mask[..., None]
        # undo the white composite; a fully transparent pixel has no color, call it white
        color = np.where(alpha > 0, (self.rgb - (1.0 - alpha)) / np.maximum(alpha, 1e-8), 1.0)
        return _to_uint8(np.concatenate([color, alpha], axis=-1))


# ---------------------------------------------------------------- loading


def load_image(path, cfg: MattingConfig | None = None) -> Image.Image:
    """Open and fully decode an image, upright (EXIF), as RGB or RGBA."""
    cfg = cfg or MattingConfig()
    path = Path(path)
    _check_is_file(path)
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so a damaged file fails here and not in a later stage
            image = _to_rgb_or_rgba(ImageOps.exif_transpose(opened))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise InputImageError(
            f"Input image {path} could not be read as an image ({err}).",
            "Give a PNG or JPEG file; if it opens elsewhere, re-save it as PNG and try again.",
        ) from err
    _check_size(image, path, cfg.min_input_size)
    return image


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise InputImageError(
            f"Input image {path} is a folder, not an image.",
            "Pass the path of one image file (PNG or JPEG) inside it.",
        )
    if not path.exists():
        raise InputImageError(
            f"Input image {path} does not exist.",
            f"Check the path (relative paths start from {Path.cwd()}).",
        )


def _check_size(image: Image.Image, path: Path, minimum: int) -> None:
    width, height = image.size
    if min(width, height) < minimum:
        raise InputImageError(
            f"Input image {path} is {width}x{height} pixels; "
            f"its short side must be at least {minimum} pixels.",
            "Use a larger photo of the object (512 pixels or more works best).",
        )


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES:
        image = _to_8bit(image)
    # palette and RGB/L images can carry transparency as a tRNS entry rather than a band
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit gray to 8-bit; PIL's own convert clips at 255 instead of scaling."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
    elif image.mode == "I":  # 32-bit: usually a 16-bit file, unless every value fits in 8 bits
        scale = 1 / 257 if values.max(initial=0.0) > 255 else 1.0
    else:
        scale = 1 / 257
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- cut-out


def has_alpha(image: Image.Image) -> bool:
    """True when the image's alpha says something (some pixel is not fully opaque)."""
    return image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255


def cut_out(image: Image.Image, cfg: MattingConfig, remover: Remover | None = None) -> np.ndarray:
    """float32 [H,W,4] straight RGBA: the image's own alpha if it has one, else rembg's.

    `cfg` is taken for a uniform stage signature; no setting of it changes the cut-out today.
    """
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    if has_alpha(image):
        return rgba
    remover = remover or rembg_remover()
    rgba[..., 3] = _as_alpha(remover(image.convert("RGB")), image.size)
    return rgba


def _as_alpha(result, size: tuple[int, int]) -> np.ndarray:
    if isinstance(result, Image.Image):
        result = result.getchannel("A") if "A" in result.getbands() else result.convert("L")
    alpha = np.asarray(result)
    if alpha.shape != (size[1], size[0]):
        raise ValueError(f"remover returned a mask of shape {alpha.shape}, expected {(size[1], size[0])}")
    if np.issubdtype(alpha.dtype, np.integer):
        alpha = alpha / 255.0
    return np.clip(alpha, 0.0, 1.0).astype(np.float32)


def rembg_remover() -> Remover:
    """rembg's U2-Net as a remover; fails fast (no download attempt) when it cannot run."""
    if importlib.util.find_spec("rembg") is None:
        raise _missing_weights("rembg is not installed.")
    model = find_u2net_weights()
    if model is None:
        raise _missing_weights(f"The background-removal model u2net.onnx is not in {u2net_dir()}.")
    import rembg  # slow to import (numba), so only once we know it can run

    return functools.partial(rembg.remove, session=_rembg_session(str(model)), only_mask=True)


def u2net_dir() -> Path:
    """Where rembg looks for u2net.onnx (U2NET_HOME, else ~/.u2net)."""
    default = os.path.join(os.environ.get("XDG_DATA_HOME", "~"), ".u2net")
    return Path(os.environ.get("U2NET_HOME", default)).expanduser()


def find_u2net_weights() -> Path | None:
    """The u2net.onnx rembg would load, checked without importing rembg or touching the network."""
    candidates = [u2net_dir() / "u2net.onnx"]
    # rembg >= 2.0.6x also keeps models in <home>/models/u2net, home being U2NET_HOME if set,
    # else REMBG_HOME, else $XDG_DATA_HOME/rembg or ~/.rembg
    if "U2NET_HOME" in os.environ:
        home = u2net_dir()
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        default = os.path.join(xdg, "rembg") if xdg else "~/.rembg"
        home = Path(os.environ.get("REMBG_HOME", default)).expanduser()
    candidates.append(home / "models" / "u2net" / "u2net.onnx")
    return next((path for path in candidates if path.is_file()), None)


@functools.lru_cache(maxsize=2)
def _rembg_session(model_path: str):
    import rembg

    try:
        return rembg.new_session("u2net")
    except Exception as err:  # onnxruntime reports a bad model file with its own exception types
        raise _missing_weights(f"rembg could not load {model_path} ({err}).") from err


def _missing_weights(problem: str) -> MissingWeightsError:
    return MissingWeightsError(
        problem,
        "Give an image with transparency (an RGBA PNG whose alpha marks the object), "
        f"or install rembg (pip install rembg onnxruntime) and put u2net.onnx in {u2net_dir()} "
        "(or set U2NET_HOME to the folder that holds it).",
    )


# ---------------------------------------------------------------- framing


def center_on_square(rgba: np.ndarray, cfg: MattingConfig) -> np.ndarray:
    """Frame the object: its box centered, its longer side `object_fraction` of a square canvas."""
    alpha = rgba[..., 3]
    inside = alpha > cfg.alpha_threshold
    _check_object_found(inside, cfg)
    # resample premultiplied color, else the (often black) color of transparent pixels
    # bleeds into the edge and leaves a dark fringe
    premultiplied = np.concatenate([rgba[..., :3] * alpha[..., None], alpha[..., None]], axis=-1)
    framed = _resample_box(premultiplied, _framing_box(inside, cfg.object_fraction), cfg.image_size)
    return _unpremultiply(framed)


def _check_object_found(inside: np.ndarray, cfg: MattingConfig) -> None:
    covered = float(inside.mean())
    if covered < cfg.min_object_fraction:
        raise InputImageError(
            f"No object found: the mask covers {covered:.2%} of the image "
            f"(at least {cfg.min_object_fraction:.1%} is needed).",
            "Use an image where the object is clearly visible, "
            "or give an RGBA image whose alpha marks the object.",
        )


def _framing_box(inside: np.ndarray, object_fraction: float) -> tuple[float, float, float, float]:
    """The square region of the source (pixel-edge coordinates) that becomes the whole canvas."""
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    center_x = (cols[0] + cols[-1] + 1) / 2
    center_y = (rows[0] + rows[-1] + 1) / 2
    half = max(cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]) / object_fraction / 2
    return (center_x - half, center_y - half, center_x + half, center_y + half)


def _resample_box(image: np.ndarray, box, size: int) -> np.ndarray:
    """Lanczos-resample `box` of a float [H,W,C] image to [size,size,C]; outside is zero."""
    height, width = image.shape[:2]
    # PIL only resamples boxes inside the image, so pad with transparent pixels first
    pad = int(np.ceil(max(0.0, -box[0], -box[1], box[2] - width, box[3] - height))) + 1
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    shifted = tuple(float(value + pad) for value in box)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(padded[..., c])).resize(
            (size, size), Image.Resampling.LANCZOS, box=shifted))
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=-1)


def _unpremultiply(premultiplied: np.ndarray) -> np.ndarray:
    # Lanczos overshoots at edges: keep alpha in [0,1] and color within its alpha
    alpha = np.clip(premultiplied[..., 3:], 0.0, 1.0)
    color = np.clip(premultiplied[..., :3], 0.0, alpha)
    straight = np.where(alpha > 1e-6, color / np.maximum(alpha, 1e-6), 0.0)
    return np.concatenate([straight, alpha], axis=-1).astype(np.float32)


# ---------------------------------------------------------------- the reference


def prepare_reference(path, cfg: MattingConfig, remover: Remover | None = None) -> ReferenceImage:
    """load -> cut out -> center on a square -> composite over white."""
    image = load_image(path, cfg)
    source = "alpha" if has_alpha(image) else "rembg"
    cut = cut_out(image, cfg, remover)
    framed = center_on_square(cut, cfg)
    reference = _reference_from_rgba(_to_uint8(framed), source)
    box = _framing_box(cut[..., 3] > cfg.alpha_threshold, cfg.object_fraction)
    reference.framing = {"box": [round(float(v), 3) for v in box], "size": list(image.size)}
    return reference


def _reference_from_rgba(rgba: np.ndarray, source: str) -> ReferenceImage:
    """Build from the 8-bit RGBA, the form that is saved, so a saved reference loads back identical."""
    rgba = rgba.copy()
    rgba[rgba[..., 3] == 0, :3] = 255  # invisible pixels carry no color: fix it, so equal images hash equal
    values = rgba.astype(np.float32) / 255.0
    mask = values[..., 3]
    rgb = values[..., :3] * mask[..., None] + (1.0 - mask[..., None])
    return ReferenceImage(rgb=rgb, mask=mask, content_hash=_content_hash(rgba), source=source)


def _content_hash(rgba: np.ndarray) -> str:
    digest = hashlib.sha256(f"{rgba.shape[1]}x{rgba.shape[0]}:".encode())
    digest.update(np.ascontiguousarray(rgba).tobytes())
    return digest.hexdigest()


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_reference(ref: ReferenceImage, outdir) -> dict[str, Path]:
    """Write reference.png (RGBA) and reference_mask.png (L); each appears complete or not at all."""
    outdir = Path(outdir)
    paths = {"reference": outdir / REFERENCE_NAME, "mask": outdir / MASK_NAME}
    rgba = ref.rgba_uint8()
    info = PngImagePlugin.PngInfo()
    info.add_text(_SOURCE_KEY, ref.source)
    if ref.framing:
        info.add_text(_FRAMING_KEY, json.dumps(ref.framing))
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        _write_png_atomic(Image.fromarray(rgba), paths["reference"], info)
        _write_png_atomic(Image.fromarray(np.ascontiguousarray(rgba[..., 3])), paths["mask"])
    except OSError as err:
        raise OutputDirError(
            f"Could not write the reference image to {outdir} ({err}).",
            "Choose an output folder you can write to, on a disk with free space.",
        ) from err
    return paths


def _write_png_atomic(image: Image.Image, path: Path, info: PngImagePlugin.PngInfo | None = None) -> None:
    # same folder, so os.replace is a rename and a reader never sees half a file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_reference(outdir) -> ReferenceImage:
    """Read back what save_reference wrote."""
    path = Path(outdir) / REFERENCE_NAME
    if not path.is_file():
        raise OutputDirError(
            f"There is no {REFERENCE_NAME} in {outdir}.",
            "Prepare the reference first, or point to the output folder of an earlier run.",
        )
    try:
        with Image.open(path) as opened:
            opened.load()
            source = opened.info.get(_SOURCE_KEY, "alpha")
            framing = opened.info.get(_FRAMING_KEY)
            rgba = np.asarray(opened.convert("RGBA"))
    except (OSError, SyntaxError, ValueError) as err:
        raise OutputDirError(
            f"{path} could not be read ({err}).",
            "Delete it and prepare the reference again from the input image.",
        ) from err
    reference = _reference_from_rgba(rgba, source)
    try:
        reference.framing = json.loads(framing) if framing else None
    except ValueError:
        reference.framing = None
    return reference
