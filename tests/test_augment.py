"""Textual-inversion augmentations: one random, reproducible re-framing of the reference per call."""

import dataclasses

import pytest
import torch

from engine.augment import AugmentationConfig, augment, augment_batch

RESOLUTION = 64
OBJECT_COLOR = torch.tensor([0.8, 0.2, 0.1])


def object_on_white(size: int = 128) -> torch.Tensor:
    """A reference-like image: a colored square covering the middle half, on white."""
    image = torch.ones(3, size, size)
    image[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = OBJECT_COLOR[:, None, None]
    return image


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def object_pixels(image: torch.Tensor) -> torch.Tensor:
    """Where the image is clearly not white background."""
    return (image.min(dim=0).values < 0.7)


GEOMETRY_ONLY = AugmentationConfig(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


@pytest.mark.parametrize("seed", range(5))
def test_output_is_square_at_the_resolution_and_in_range(seed):
    out = augment(object_on_white(), RESOLUTION, seeded(seed))
    assert out.shape == (3, RESOLUTION, RESOLUTION)
    assert out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_non_square_input_gives_square_output():
    out = augment(torch.rand(3, 90, 160), RESOLUTION, seeded(0))
    assert out.shape == (3, RESOLUTION, RESOLUTION)


def test_same_seed_gives_the_same_augmentation():
    image = object_on_white()
    assert torch.equal(augment(image, RESOLUTION, seeded(7)), augment(image, RESOLUTION, seeded(7)))


def test_different_seeds_give_different_augmentations():
    image = object_on_white()
    outs = [augment(image, RESOLUTION, seeded(seed)) for seed in range(4)]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j])


def test_batch_holds_independent_augmentations_and_is_reproducible():
    batch = augment_batch(object_on_white(), RESOLUTION, 4, seeded(3))
    assert batch.shape == (4, 3, RESOLUTION, RESOLUTION)
    assert not torch.allclose(batch[0], batch[1])
    assert torch.equal(batch, augment_batch(object_on_white(), RESOLUTION, 4, seeded(3)))


def test_mean_color_stays_close_to_the_reference():
    image = object_on_white()
    batch = augment_batch(image, RESOLUTION, 32, seeded(0))
    # color jitter clips brightened white at 1 but not darkened white, so allow a small bias
    assert torch.allclose(batch.mean(dim=(0, 2, 3)), image.mean(dim=(1, 2)), atol=0.1)
    geometric = augment_batch(image, RESOLUTION, 32, seeded(0), GEOMETRY_ONLY)
    assert torch.allclose(geometric.mean(dim=(0, 2, 3)), image.mean(dim=(1, 2)), atol=0.03)


def test_geometry_keeps_the_object_color():
    out = augment(object_on_white(), RESOLUTION, seeded(1), GEOMETRY_ONLY)
    center = out[:, RESOLUTION // 2, RESOLUTION // 2]
    assert torch.allclose(center, OBJECT_COLOR, atol=0.02)


def test_flip_mirrors_the_image_about_half_the_time():
    image = torch.ones(3, 128, 128)
    image[:, :, :32] = 0.0  # a dark band on the left only
    flip_only = AugmentationConfig(
        rotation_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
        color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
    )
    unflipped = augment(image, RESOLUTION, seeded(0), dataclasses.replace(flip_only, flip_p=0.0))
    outs = [augment(image, RESOLUTION, seeded(seed), flip_only) for seed in range(20)]
    flipped = [torch.allclose(out, unflipped.flip(-1), atol=1e-5) for out in outs]
    kept = [torch.allclose(out, unflipped, atol=1e-5) for out in outs]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 3 <= sum(flipped) <= 17


def test_the_object_stays_mostly_in_frame():
    image = object_on_white()
    before = object_pixels(image).float().mean()
    coords = torch.linspace(-1, 1, RESOLUTION)
    for seed in range(16):
        mask = object_pixels(augment(image, RESOLUTION, seeded(seed), GEOMETRY_ONLY)).float()
        assert 0.6 * before < mask.mean() < 1.6 * before  # zoom within the crop-scale range
        center_y = (mask.sum(dim=1) * coords).sum() / mask.sum()
        center_x = (mask.sum(dim=0) * coords).sum() / mask.sum()
        assert abs(center_x) < 0.25 and abs(center_y) < 0.25  # and not pushed off to a side


def test_background_outside_the_image_is_white_not_black():
    # zooming out (crop larger than the image) and rotating uncover area beyond the image
    zoom_out = dataclasses.replace(GEOMETRY_ONLY, rotation_p=1.0, crop_scale=(1.15, 1.15), flip_p=0.0)
    out = augment(torch.ones(3, 128, 128), RESOLUTION, seeded(0), zoom_out)
    assert out.min() > 0.99
