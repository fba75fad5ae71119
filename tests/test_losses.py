"""Loss terms of the field fit, against what their definitions say."""

import torch

from engine.losses import (gaussian_blur, gaussian_kernel, mask_loss, normal_smoothness_2d, opacity_entropy,
                           reference_image_loss)
from engine.system import ReferenceView


def _photo_over_white(color, mask):
    return ReferenceView(color * mask[..., None] + (1 - mask[..., None]), mask)


def test_image_loss_ignores_the_background_and_never_asks_it_to_change():
    color = torch.rand(8, 8, 3)
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    background = torch.rand(8, 8, 3, requires_grad=True)
    own = (color * mask[..., None]).requires_grad_(True)
    rendered = own + background * (1 - mask[..., None])  # as the renderer composites
    photo = _photo_over_white(color, mask)
    assert reference_image_loss(rendered, mask, background, photo.premultiplied) < 1e-12
    reference_image_loss(rendered + 0.1, mask, background, photo.premultiplied).backward()
    assert not background.grad.any() and own.grad.abs().min() > 0


def test_image_loss_is_exact_at_a_soft_edge():
    """A pixel half covered by the object: the photo (over white) reads c/2 + 1/2. A render with opacity 1/2
    and the object's color over any background scores zero; the old loss, which composited the photo over the
    background a second time, wanted a white fringe of (1 - c) / 4 there."""
    color = torch.tensor([0.2, 0.4, 0.1]).expand(4, 4, 3).clone()
    mask = torch.full((4, 4), 0.5)
    background = torch.full((4, 4, 3), 0.3)
    rendered = color * 0.5 + background * 0.5
    photo = _photo_over_white(color, mask)
    assert reference_image_loss(rendered, mask, background, photo.premultiplied) < 1e-12
    old_target = photo.rgb * mask[..., None] + background * (1 - mask[..., None])
    assert torch.allclose(old_target - rendered, (1 - color) / 4, atol=1e-6)  # the fringe the old loss asked for
    assert reference_image_loss(rendered + 0.1, mask, background, photo.premultiplied) > 0.009


def test_mask_loss_is_mse_of_opacity():
    assert mask_loss(torch.full((4, 4), 0.5), torch.ones(4, 4)) == 0.25


def test_gaussian_kernel_is_normalised_and_symmetric():
    k = gaussian_kernel(9)
    assert torch.isclose(k.sum(), torch.tensor(1.0)) and torch.allclose(k, k.flip(0))
    assert k.argmax() == 4


def test_blur_keeps_constants_and_smooths_noise():
    flat = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(flat, 9), flat, atol=1e-6)
    noise = torch.randn(1, 1, 32, 32)
    assert gaussian_blur(noise, 9).std() < 0.5 * noise.std()


def test_normal_smoothness_is_zero_for_flat_normals_and_positive_for_noisy_ones():
    flat = torch.zeros(1, 16, 16, 3)
    flat[..., 2] = 1
    assert normal_smoothness_2d(flat, 9) < 1e-10
    noisy = torch.nn.functional.normalize(flat + 0.3 * torch.randn_like(flat), dim=-1).requires_grad_(True)
    loss = normal_smoothness_2d(noisy, 9)
    loss.backward()
    assert loss > 1e-3 and noisy.grad.abs().sum() > 0


def test_entropy_is_highest_at_half_opacity_and_near_zero_at_the_ends():
    half = opacity_entropy(torch.full((4,), 0.5))
    assert torch.isclose(half, torch.tensor(1.0))  # one bit, as the official log2 entropy
    assert opacity_entropy(torch.tensor([0.0, 1.0])) < 1e-3
