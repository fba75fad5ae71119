"""Loss terms of the field fit, against what their definitions say."""

import torch

from engine.losses import (gaussian_blur, gaussian_kernel, mask_loss, normal_smoothness_2d, opacity_entropy,
                           reference_image_loss)


def test_image_loss_ignores_the_background_outside_the_mask():
    target = torch.rand(8, 8, 3)
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    background = torch.rand(8, 8, 3)
    rendered = target * mask[..., None] + background * (1 - mask[..., None])
    assert reference_image_loss(rendered, background, target, mask) == 0.0
    # ...and gives the background no gradient (the object must not paint it).
    background.requires_grad_(True)
    reference_image_loss((rendered + 0.1).requires_grad_(True), background, target, mask).backward()
    assert background.grad is None or not background.grad.any()


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
    assert torch.isclose(half, torch.log(torch.tensor(2.0)))
    assert opacity_entropy(torch.tensor([0.0, 1.0])) < 1e-3
