"""Step 1: from a user's photo to a centered, square reference image of the object on white."""

import numpy as np
import pytest
from PIL import Image

from engine.config import MattingConfig
from engine.errors import InputImageError, MissingWeightsError
from engine.matting import (
    MASK_NAME,
    REFERENCE_NAME,
    center_on_square,
    cut_out,
    load_image,
    load_reference,
    prepare_reference,
    save_reference,
)

CFG = MattingConfig(image_size=128)
RED = (255, 0, 0)


def never_called(image):
    pytest.fail("the remover must not run when the image has its own alpha")


def rgba_with_box(size=(200, 160), box=(40, 30, 100, 90), color=RED) -> Image.Image:
    """Transparent black canvas (as many editors save it) with an opaque box (x0, y0, x1, y1)."""
    pixels = np.zeros((size[1], size[0], 4), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (*color, 255)
    return Image.fromarray(pixels)


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def object_box(mask: np.ndarray):
    rows = np.flatnonzero((mask > 0.5).any(axis=1))
    cols = np.flatnonzero((mask > 0.5).any(axis=0))
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


# ---------------------------------------------------------------- where the alpha comes from


def test_rgba_input_uses_its_alpha_and_never_calls_the_remover(tmp_path):
    path = save(rgba_with_box(), tmp_path / "cup.png")
    ref = prepare_reference(path, CFG, remover=never_called)
    assert ref.source == "alpha"
    assert ref.rgb.shape == (128, 128, 3) and ref.mask.shape == (128, 128)
    assert ref.rgb.dtype == np.float32 and ref.mask.dtype == np.float32
    assert ref.mask.max() == 1.0 and ref.mask[0, 0] == 0.0
    assert np.allclose(ref.rgb[0, 0], 1.0)  # white outside the object
    assert np.allclose(ref.rgb[64, 64], (1.0, 0.0, 0.0))


def test_rgb_input_calls_the_injected_remover(tmp_path):
    path = save(Image.new("RGB", (120, 100), (0, 0, 255)), tmp_path / "photo.jpg", quality=95)
    calls = []

    def remover(image):
        calls.append((image.mode, image.size))
        mask = np.zeros((100, 120), np.uint8)
        mask[20:80, 30:90] = 255
        return Image.fromarray(mask)

    ref = prepare_reference(path, CFG, remover=remover)
    assert calls == [("RGB", (120, 100))]
    assert ref.source == "rembg"
    assert 0.0 < ref.mask.mean() < 1.0
    assert ref.rgb[64, 64, 2] > 0.9 and ref.rgb[64, 64, 0] < 0.1  # the photo's blue, inside


def test_remover_may_return_a_float_array():
    image = Image.new("RGB", (80, 80), RED)
    rgba = cut_out(image, CFG, remover=lambda img: np.full((80, 80), 0.25, np.float32))
    assert rgba.shape == (80, 80, 4) and np.allclose(rgba[..., 3], 0.25)


def test_missing_rembg_weights_says_to_give_an_rgba_image(tmp_path, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "empty"))
    image = Image.new("RGB", (80, 80), RED)
    with pytest.raises(MissingWeightsError) as caught:
        cut_out(image, CFG)
    message = str(caught.value)
    assert "RGBA" in message
    assert "u2net.onnx" in message and "U2NET_HOME" in message
    assert str(tmp_path / "empty") in message  # where the file was looked for


# ---------------------------------------------------------------- bad inputs


def corrupt_png(tmp_path):
    data = (save(rgba_with_box(), tmp_path / "whole.png")).read_bytes()
    path = tmp_path / "corrupt.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def text_renamed(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    return path


def tiny_image(tmp_path):
    return save(Image.new("RGB", (10, 10)), tmp_path / "tiny.png")


@pytest.mark.parametrize(
    "make, expected",
    [
        (corrupt_png, "could not be read as an image"),
        (text_renamed, "could not be read as an image"),
        (lambda tmp: tmp, "is a folder"),
        (lambda tmp: tmp / "missing.png", "does not exist"),
        (tiny_image, "10x10 pixels"),
    ],
    ids=["corrupt", "text-renamed-png", "directory", "missing", "10x10"],
)
def test_unusable_input_gives_an_input_image_error_that_says_what_to_do(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(InputImageError) as caught:
        load_image(path, CFG)
    message = str(caught.value)
    assert expected in message
    assert str(path) in message
    assert caught.value.fix  # there is always something to do


def test_too_small_names_the_minimum(tmp_path):
    with pytest.raises(InputImageError, match="at least 64 pixels"):
        load_image(tiny_image(tmp_path), CFG)


def test_fully_transparent_image_has_no_object(tmp_path):
    path = save(Image.new("RGBA", (100, 100), (255, 255, 255, 0)), tmp_path / "empty.png")
    with pytest.raises(InputImageError) as caught:
        prepare_reference(path, CFG, remover=never_called)
    assert "no object found" in str(caught.value).lower()
    assert "alpha marks the object" in str(caught.value)


# ---------------------------------------------------------------- decoding


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    stored = np.zeros((80, 120, 3), np.uint8)
    stored[:, :60] = RED  # left half red as stored; orientation 6 turns it 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(Image.fromarray(stored), tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_image(path, CFG)
    assert image.size == (80, 120)  # portrait, as the camera held it
    pixels = np.asarray(image)
    assert pixels[10, 40, 0] > 200 and pixels[10, 40, 1] < 50  # red now on top
    assert pixels[110, 40, 0] < 50


@pytest.mark.parametrize(
    "image, mode",
    [
        (Image.new("L", (80, 80), 128), "RGB"),
        (Image.new("LA", (80, 80), (128, 100)), "RGBA"),
        (Image.new("P", (80, 80), 3), "RGB"),
        (Image.new("RGB", (80, 80), RED).convert("CMYK"), "RGB"),
    ],
    ids=["L", "LA", "P", "CMYK"],
)
def test_other_modes_become_rgb_or_rgba(tmp_path, image, mode):
    suffix = ".jpg" if image.mode == "CMYK" else ".png"
    assert load_image(save(image, tmp_path / f"in{suffix}"), CFG).mode == mode


def test_palette_transparency_becomes_alpha(tmp_path):
    image = Image.new("P", (80, 80), 0)
    image.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)
    image.paste(1, (20, 20, 60, 60))
    path = save(image, tmp_path / "palette.png", transparency=0)
    ref = prepare_reference(path, CFG, remover=never_called)
    assert ref.source == "alpha"


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    path = save(Image.fromarray(np.full((80, 80), 32768, np.uint16)), tmp_path / "deep.png")
    image = load_image(path, CFG)
    assert image.mode == "RGB"
    assert abs(int(np.asarray(image)[0, 0, 0]) - 128) <= 1


# ---------------------------------------------------------------- framing


def test_off_center_object_comes_out_centered_at_80_percent(tmp_path):
    # a 60x40 box in the top-left corner of a 300x200 image
    path = save(rgba_with_box(size=(300, 200), box=(10, 15, 70, 55)), tmp_path / "corner.png")
    cfg = MattingConfig(image_size=256)
    ref = prepare_reference(path, cfg, remover=never_called)
    x0, y0, x1, y1 = object_box(ref.mask)
    assert abs((x0 + x1) / 2 - 128) <= 1 and abs((y0 + y1) / 2 - 128) <= 1
    assert abs((x1 - x0) - 0.8 * 256) <= 2  # the longer side
    assert abs((y1 - y0) - 0.8 * 256 * 40 / 60) <= 2  # aspect kept


def test_object_larger_than_its_frame_is_padded_not_cut(tmp_path):
    # the object fills the whole input: the canvas must reach beyond the input's edges
    path = save(Image.new("RGBA", (100, 100), (*RED, 254)), tmp_path / "full.png")
    ref = prepare_reference(path, CFG, remover=never_called)
    x0, y0, x1, y1 = object_box(ref.mask)
    assert abs((x1 - x0) - 0.8 * 128) <= 2
    assert ref.mask[0, 0] == 0.0


def test_edges_have_no_dark_fringe():
    # transparent pixels are black: resampling straight color would darken the object's edge
    image = np.zeros((300, 300, 4), np.float32)
    yy, xx = np.mgrid[:300, :300]
    disk = (yy - 150) ** 2 + (xx - 150) ** 2 < 100**2
    image[disk] = (1.0, 0.0, 0.0, 1.0)
    framed = center_on_square(image, CFG)
    edge = (framed[..., 3] > 0.02) & (framed[..., 3] < 0.98)
    assert edge.sum() > 50  # the downscale does produce a soft edge
    assert framed[edge, 0].min() > 0.97  # and its color stays red, not dark
    over_white = framed[..., :3] * framed[..., 3:] + (1 - framed[..., 3:])
    assert over_white[..., 0].min() > 0.97


# ---------------------------------------------------------------- saving and identity


def test_save_load_round_trip(tmp_path):
    ref = prepare_reference(save(rgba_with_box(), tmp_path / "in.png"), CFG, remover=never_called)
    paths = save_reference(ref, tmp_path / "out")
    assert paths["reference"].name == REFERENCE_NAME and paths["mask"].name == MASK_NAME
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([REFERENCE_NAME, MASK_NAME])
    with Image.open(paths["reference"]) as saved:
        assert saved.mode == "RGBA"
    with Image.open(paths["mask"]) as mask:
        assert mask.mode == "L"
        assert np.array_equal(np.asarray(mask), ref.rgba_uint8()[..., 3])
    loaded = load_reference(tmp_path / "out")
    assert np.array_equal(loaded.rgb, ref.rgb) and np.array_equal(loaded.mask, ref.mask)
    assert loaded.content_hash == ref.content_hash and loaded.source == ref.source


def test_saving_again_replaces_the_files(tmp_path):
    first = prepare_reference(save(rgba_with_box(), tmp_path / "a.png"), CFG, remover=never_called)
    green = save(rgba_with_box(color=(0, 255, 0)), tmp_path / "b.png")
    second = prepare_reference(green, CFG, remover=never_called)
    save_reference(first, tmp_path / "out")
    save_reference(second, tmp_path / "out")
    assert load_reference(tmp_path / "out").content_hash == second.content_hash
    assert len(list((tmp_path / "out").iterdir())) == 2  # no temporary files left behind


def test_content_hash_follows_content_not_file_name(tmp_path):
    a = prepare_reference(save(rgba_with_box(), tmp_path / "a.png"), CFG, remover=never_called)
    b = prepare_reference(save(rgba_with_box(), tmp_path / "copy of a.png"), CFG, remover=never_called)
    blue = save(rgba_with_box(color=(0, 0, 255)), tmp_path / "c.png")
    c = prepare_reference(blue, CFG, remover=never_called)
    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash
    assert len(a.content_hash) == 64
