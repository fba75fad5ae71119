"""The fast execution paths compute what the plain eager path computes (shrunk; the full-size GPU
check is bench/check_fastpaths.py).

* textual inversion batched (batch_size x grad_accumulation views in one batch) gives the embedding
  row the gradient that accumulating the micro-batches gives, for the same views, noise and t;
* the augmentations of a batch are the ones `augment` makes one by one, on any device;
* the compiled UNet/VAE calls (torch.compile; here with the "aot_eager_decomp_partition" backend, which runs
  torch.compile's tracing and autograd on the CPU without generating code) give the eager SDS
  gradient into the render and the eager textual-inversion gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.augment import augment, augment_batch
from engine.config import PriorConfig, TextualInversionConfig, preset
from engine.errors import EngineError
from engine.guidance import (StableDiffusionGuidance, add_placeholder_token, load_stable_diffusion,
                             text_embeddings_for_guidance, train_embedding)
from engine.guidance.fast_paths import prior_modules
from engine.guidance.textual_inversion import denoising_loss, training_batch

PROMPT = "an image of a <e>"


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_stable_diffusion(str(tiny_sd_dir), "cpu")


@pytest.fixture(scope="module")
def token_id(sd):
    return add_placeholder_token(sd)


@pytest.fixture(scope="module")
def image():
    picture = torch.ones(3, 40, 40)
    picture[:, 10:30, 12:28] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    return picture


def _row_gradient(sd, token_id, latents, t, noise, chunks: int, modules=None) -> torch.Tensor:
    """d loss / d row of eq. (2), the batch split into `chunks` micro-batches whose losses are averaged."""
    initial = sd.text_encoder.get_input_embeddings().weight[token_id].detach().float()
    vector = torch.nn.Parameter(initial.clone())
    for part in zip(latents.chunk(chunks), t.chunk(chunks), noise.chunk(chunks)):
        (denoising_loss(sd, *part, vector, token_id, PROMPT, modules) / chunks).backward()
    return vector.grad


def test_batched_textual_inversion_has_the_accumulated_gradient(sd, token_id, image):
    latents, t, noise = training_batch(sd, image, 32, 4, torch.Generator().manual_seed(0))
    accumulated = _row_gradient(sd, token_id, latents, t, noise, chunks=4)  # paper: batch 1 x accumulation 4
    batched = _row_gradient(sd, token_id, latents, t, noise, chunks=1)  # one batch of 4
    assert accumulated.norm() > 0
    torch.testing.assert_close(batched, accumulated, rtol=1e-4, atol=1e-5 * float(accumulated.abs().max()))
    # and it is not trivially so: one micro-batch alone has another gradient
    alone = _row_gradient(sd, token_id, latents[:1], t[:1], noise[:1], chunks=1)
    assert not torch.allclose(alone, accumulated, rtol=1e-2)


def test_paper_preset_keeps_the_recipe_and_runs_it_as_one_batch():
    ti = preset("paper").textual_inversion
    assert (ti.batch_size, ti.grad_accumulation, ti.accumulate_as_batch) == (1, 4, True)


@pytest.mark.parametrize("as_batch", [True, False])
def test_training_runs_both_ways_and_is_reproducible(sd, image, as_batch):
    cfg = TextualInversionConfig(steps=2, batch_size=1, grad_accumulation=2, learning_rate=2e-2, resolution=32,
                                 accumulate_as_batch=as_batch)
    first = train_embedding(sd, image, cfg, torch.Generator().manual_seed(0))
    again = train_embedding(sd, image, cfg, torch.Generator().manual_seed(0))
    assert len(first.losses) == 2 and all(loss > 0 for loss in first.losses)
    assert torch.equal(first.vector, again.vector)


def test_batch_augmentations_are_the_one_by_one_augmentations(image):
    batch = augment_batch(image, 32, 5, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    one_by_one = torch.stack([augment(image, 32, generator) for _ in range(5)])
    torch.testing.assert_close(batch, one_by_one, rtol=0, atol=1e-6)


def test_unknown_compile_mode_is_refused(sd):
    with pytest.raises(EngineError) as info:
        prior_modules(sd, "fastest")
    assert "none" in info.value.fix


def test_cpu_runs_eager_whatever_the_mode(sd):
    assert prior_modules(sd, "cudagraphs").mode == "none"
    assert prior_modules(sd, "compile").mode == "none"


def _sds_image_gradient(sd, cfg: PriorConfig, modules=None) -> torch.Tensor:
    guidance = StableDiffusionGuidance(sd, text_embeddings_for_guidance(sd, "an image of a object", None, None), cfg,
                                       modules=modules)
    images = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(5)).requires_grad_()
    guidance.sds_loss(images, generator=torch.Generator().manual_seed(6)).loss.backward()
    return images.grad


def test_compiled_prior_matches_eager(sd, token_id, image):
    compiled = prior_modules(sd, "compile", backend="aot_eager_decomp_partition")
    assert compiled.mode == "compile"
    cfg = dataclasses.replace(PriorConfig(), guidance_scale=7.5)
    eager_grad = _sds_image_gradient(sd, cfg)
    compiled_grad = _sds_image_gradient(sd, cfg, compiled)
    assert eager_grad.norm() > 0
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5 * float(eager_grad.abs().max()))

    latents, t, noise = training_batch(sd, image, 32, 2, torch.Generator().manual_seed(0))
    latents_compiled, _, _ = training_batch(sd, image, 32, 2, torch.Generator().manual_seed(0), compiled)
    torch.testing.assert_close(latents_compiled, latents, rtol=1e-4, atol=1e-5)
    eager_row = _row_gradient(sd, token_id, latents, t, noise, chunks=1)
    compiled_row = _row_gradient(sd, token_id, latents, t, noise, chunks=1, modules=compiled)
    torch.testing.assert_close(compiled_row, eager_row, rtol=1e-4, atol=1e-5 * float(eager_row.abs().max()))


def test_vae_math_attention_gives_the_sdpa_gradient_and_layouts_switch_back(sd):
    """prior.vae_attention=math (two matmuls instead of SDPA's memory-efficient kernel) is the same math."""
    cfg = dataclasses.replace(PriorConfig(), guidance_scale=7.5)
    assert any(type(p).__name__ == "AttnProcessor2_0" for p in sd.vae.attn_processors.values())
    sdpa = _sds_image_gradient(sd, cfg, prior_modules(sd, "none", vae_attention="sdpa"))
    math_grad = _sds_image_gradient(sd, cfg, prior_modules(sd, "none", vae_attention="math"))
    assert {type(p).__name__ for p in sd.vae.attn_processors.values()} == {"AttnProcessor"}
    torch.testing.assert_close(math_grad, sdpa, rtol=1e-4, atol=1e-5 * float(sdpa.abs().max()))
    prior_modules(sd, "none")  # back to diffusers' default for the other tests of this module
    assert {type(p).__name__ for p in sd.vae.attn_processors.values()} == {"AttnProcessor2_0"}
    with pytest.raises(EngineError):
        prior_modules(sd, "none", vae_attention="flash")


def test_posterior_sample_is_diffusers_draw_for_draw():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from engine.guidance.fast_paths import sample_posterior

    parameters = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(1))
    ours = sample_posterior(parameters, torch.Generator().manual_seed(2))
    theirs = DiagonalGaussianDistribution(parameters).sample(torch.Generator().manual_seed(2))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, sample_posterior(parameters, torch.Generator().manual_seed(3)))


def test_presets_run_the_prior_from_cuda_graphs_with_an_nchw_vae():
    for name in ("fast", "standard", "paper"):
        prior = preset(name).prior
        assert (prior.compile, prior.channels_last, prior.vae_channels_last, prior.vae_attention) == (
            "graphs", True, False, "math")
