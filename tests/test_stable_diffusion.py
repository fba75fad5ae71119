"""Loading the prior and the SDS gradient (eq. (3) of RealFusion), on a tiny random Stable Diffusion."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest
import torch

from engine.config import PriorConfig
from engine.errors import EngineError, MissingWeightsError
from engine.guidance import StableDiffusionGuidance, load_stable_diffusion, resolve_dtype, text_embeddings_for_guidance


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_stable_diffusion(str(tiny_sd_dir), "cpu")


@pytest.fixture(scope="module")
def text_embeddings(sd):
    return text_embeddings_for_guidance(sd, "an image of a object", None, None)


def guidance(sd, text_embeddings, unet=None, **prior) -> StableDiffusionGuidance:
    """Guidance over `sd`, optionally with a stub UNet swapped in (without touching the shared fixture)."""
    model = dataclasses.replace(sd, unet=unet) if unet is not None else sd
    return StableDiffusionGuidance(model, text_embeddings, PriorConfig(**prior))


class StubUNet:
    """Stands in for the UNet: `predict(x_t, t)` gives eps_hat for both CFG branches, or `branches` fixed ones."""

    def __init__(self, predict=None, branches=None):
        self.predict, self.branches = predict, branches

    def __call__(self, sample, timestep, encoder_hidden_states):
        if self.branches is not None:
            return SimpleNamespace(sample=torch.cat(self.branches))
        half = sample.shape[0] // 2
        return SimpleNamespace(sample=self.predict(sample, timestep).float()[:half].repeat(2, 1, 1, 1))


class LatentGuidance(StableDiffusionGuidance):
    """SDS applied directly to latents (identity encoder), to test the surrogate loss and its sign."""

    def encode(self, images, generator=None):
        return images


def abar(sd, t):
    return sd.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)


# ---- loading ---------------------------------------------------------------------------------


def test_loads_tiny_folder_frozen(sd, tiny_sd_dir):
    assert sd.resolution == 32 and sd.vae_scale_factor == 2
    assert sd.dtype == torch.float32 and sd.device == torch.device("cpu")
    assert sd.model_id == str(tiny_sd_dir.resolve())
    for module in (sd.text_encoder, sd.unet, sd.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert type(sd.scheduler).__name__ == "DDPMScheduler"


def test_missing_folder_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in (str(tmp_path / "no-such-model"), "nobody-here/no-such-model"):
        with pytest.raises(MissingWeightsError) as caught:
            load_stable_diffusion(model, "cpu")
        message = str(caught.value)
        assert repr(model) in message and "huggingface-cli download" in message and "--model" in message
    assert "offline" in message  # the hub id case says why the hub was not asked


def test_missing_subfolder_is_named(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    partial = shutil.copytree(tiny_sd_dir, tmp_path / "partial")
    shutil.rmtree(partial / "vae")
    with pytest.raises(MissingWeightsError, match="has no vae/"):
        load_stable_diffusion(str(partial), "cpu")


def test_dtype_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(EngineError) as caught:
        resolve_dtype("fp16", "cpu")
    assert "fp32" in caught.value.fix


# ---- SDS -------------------------------------------------------------------------------------


def test_sds_gradient_reaches_the_image(sd, text_embeddings):
    images = torch.rand(2, 3, 24, 24, requires_grad=True)  # not the model's size: upsampled inside
    out = guidance(sd, text_embeddings).sds_loss(images, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.ndim == 0 and out.timesteps.shape == (2,)
    assert images.grad.shape == images.shape
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_sds_gradient_is_weighted_cfg_residual(sd, text_embeddings):
    g = guidance(sd, text_embeddings, guidance_scale=7.5)
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([100, 700])
    a = abar(sd, t)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    uncond, cond = text_embeddings[:1].expand(2, -1, -1), text_embeddings[1:].expand(2, -1, -1)
    with torch.no_grad():
        eps_u = sd.unet(noisy, t, encoder_hidden_states=uncond).sample
        eps_c = sd.unet(noisy, t, encoder_hidden_states=cond).sample
    expected = (1 - a) * (eps_u + 7.5 * (eps_c - eps_u) - noise)
    torch.testing.assert_close(g.sds_gradient(latents, t, noise), expected, rtol=1e-4, atol=1e-5)


def test_guidance_scale_one_is_the_conditional_prediction(sd, text_embeddings):
    eps_u, eps_c = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    stub = StubUNet(branches=(eps_u, eps_c))
    noise, t = torch.randn(1, 4, 16, 16), torch.tensor([400])
    grad = guidance(sd, text_embeddings, stub, guidance_scale=1.0).sds_gradient(torch.zeros_like(noise), t, noise)
    torch.testing.assert_close(grad, (1 - abar(sd, t)) * (eps_c - noise))


def test_perfect_noise_prediction_gives_zero_gradient(sd, text_embeddings):
    noise, t = torch.randn(2, 4, 16, 16), torch.tensor([50, 900])
    stub = StubUNet(branches=(noise, noise))  # both CFG branches predict exactly the injected noise
    grad = guidance(sd, text_embeddings, stub).sds_gradient(torch.randn_like(noise), t, noise)
    assert grad.abs().max() == 0


def test_gradient_step_moves_latents_toward_what_the_prior_believes(sd, text_embeddings):
    target = torch.randn(1, 4, 16, 16)

    def denoiser_of_target(noisy, t):  # eps_hat that explains x_t as noise around `target`
        a = abar(sd, t)
        return (noisy - a.sqrt() * target) / (1 - a).sqrt()

    g = LatentGuidance(dataclasses.replace(sd, unet=StubUNet(denoiser_of_target)), text_embeddings, PriorConfig())
    latents = torch.randn(1, 4, 16, 16, requires_grad=True)
    before = (latents - target).norm().item()
    out = g.sds_loss(latents, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    # d loss / d z = w(t) * sqrt(abar) / sqrt(1 - abar) * (z - z*): exactly, whatever the noise was.
    a = abar(sd, out.timesteps)
    expected = (1 - a) * a.sqrt() / (1 - a).sqrt() * (latents.detach() - target)
    torch.testing.assert_close(latents.grad, expected, rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        latents -= 0.5 * latents.grad / latents.grad.abs().max()
    assert (latents - target).norm().item() < before


def test_weight_vanishes_as_t_goes_to_zero(sd, text_embeddings):
    noise = torch.randn(1, 4, 16, 16)
    stub = StubUNet(branches=(noise + 1.0, noise + 1.0))  # the same residual of 1 at every t
    g = guidance(sd, text_embeddings, stub)
    small = g.sds_gradient(torch.zeros_like(noise), torch.tensor([0]), noise).abs().mean()
    middle = g.sds_gradient(torch.zeros_like(noise), torch.tensor([500]), noise).abs().mean()
    assert small < 0.01 * middle


def test_timesteps_stay_in_the_configured_range(sd, text_embeddings):
    g = guidance(sd, text_embeddings, t_range=(0.2, 0.4))
    t = g.sample_timesteps(2000, torch.Generator().manual_seed(0), None)
    assert t.min() >= 200 and t.max() <= 400 and t.max() - t.min() > 150
    out = g.sds_loss(torch.rand(3, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert ((out.timesteps >= 200) & (out.timesteps <= 400)).all()
    # step_ratio anneals t from the top of the range (start of training) to the bottom (end).
    assert g.sample_timesteps(1, None, 0.0).item() == 400 and g.sample_timesteps(1, None, 1.0).item() == 200
