"""Single-image textual inversion (eq. (2) of RealFusion), on a tiny random Stable Diffusion."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.config import TextualInversionConfig
from engine.errors import EngineError
from engine.guidance import (
    LearnedEmbedding,
    add_placeholder_token,
    cached_or_train,
    embedding_cache_key,
    encode_prompt,
    load_stable_diffusion,
    train_embedding,
)

PROMPT = "an image of a <e>"


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_stable_diffusion(str(tiny_sd_dir), "cpu")  # own copy: these tests add a token


@pytest.fixture(scope="module")
def image():
    """A red box on white, the kind of input textual inversion sees."""
    picture = torch.ones(3, 40, 40)
    picture[:, 10:30, 12:28] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    return picture


def small_config(**overrides) -> TextualInversionConfig:
    base = dict(steps=2, batch_size=1, grad_accumulation=1, learning_rate=2e-2, resolution=32)
    return TextualInversionConfig(**(base | overrides))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


@dataclasses.dataclass
class Trained:
    token_id: int
    before: dict[str, dict[str, torch.Tensor]]  # state dicts of text_encoder, unet, vae before training
    calls: list[tuple[int, float]]  # progress callbacks
    cfg: TextualInversionConfig
    embedding: LearnedEmbedding


@pytest.fixture(scope="module")
def trained(sd, image):
    """Train once (batch 2 x accumulation 2) and record what the model looked like before."""
    token_id = add_placeholder_token(sd)
    before = {name: snapshot(getattr(sd, name)) for name in ("text_encoder", "unet", "vae")}
    calls = []
    cfg = small_config(steps=20, batch_size=2, grad_accumulation=2)
    embedding = train_embedding(sd, image, cfg, torch.Generator().manual_seed(0), lambda *a: calls.append(a))
    return Trained(token_id, before, calls, cfg, embedding)


def denoising_loss(sd, image, vector, token_id) -> float:
    """Eq. (2) at fixed noise and timesteps spread over [0, T): comparable before and after training."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        pixels = F.interpolate(image[None], size=(sd.resolution,) * 2, mode="bilinear") * 2 - 1
        latents = (sd.vae.encode(pixels).latent_dist.mean * sd.vae.config.scaling_factor).expand(16, -1, -1, -1)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.linspace(0, sd.num_train_timesteps - 1, 16).long()
        context = encode_prompt(sd, PROMPT, vector, token_id).expand(16, -1, -1)
        eps = sd.unet(sd.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        return F.mse_loss(eps, noise).item()


def embedding_row(sd, token_id) -> torch.Tensor:
    return sd.text_encoder.get_input_embeddings().weight[token_id].detach().clone()


def test_placeholder_is_added_once_from_the_initializer(sd):
    first = add_placeholder_token(sd, "<e>", "object")
    size = len(sd.tokenizer)
    assert add_placeholder_token(sd, "<e>", "object") == first and len(sd.tokenizer) == size
    assert sd.text_encoder.get_input_embeddings().num_embeddings >= size
    object_id = sd.tokenizer.encode("object", add_special_tokens=False)[0]
    torch.testing.assert_close(embedding_row(sd, first), embedding_row(sd, object_id))
    with pytest.raises(EngineError, match="already a token"):
        add_placeholder_token(sd, "a", "object")  # "a" (a word piece) is in the tiny vocabulary


def test_encode_prompt_puts_the_vector_at_the_placeholder(sd):
    token_id = add_placeholder_token(sd)
    original = embedding_row(sd, token_id)
    plain = encode_prompt(sd, "an image of a object")
    torch.testing.assert_close(encode_prompt(sd, PROMPT, original, token_id), plain)
    vector = (original + 1.0).requires_grad_(True)
    substituted = encode_prompt(sd, PROMPT, vector, token_id)
    assert substituted.shape == (1, 77, sd.text_encoder.config.hidden_size)
    assert not torch.allclose(substituted, plain)
    torch.testing.assert_close(substituted[:, :5], plain[:, :5])  # causal: tokens before <e> are untouched
    substituted.sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert not sd.text_encoder.get_input_embeddings()._forward_hooks  # the shared model is left clean


def test_training_changes_only_the_new_row(sd, trained):
    for name, before in trained.before.items():
        after = getattr(sd, name).state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert torch.equal(value, after[key]), f"{name}.{key} changed"
    initial = embedding_row(sd, trained.token_id)
    assert not torch.allclose(trained.embedding.vector, initial)
    assert trained.embedding.vector.dtype == torch.float32 and trained.embedding.vector.device.type == "cpu"


def test_training_reports_every_step(trained):
    assert [step for step, _ in trained.calls] == list(range(trained.cfg.steps))
    assert [loss for _, loss in trained.calls] == trained.embedding.losses
    assert trained.embedding.steps == trained.cfg.steps and trained.embedding.final_loss > 0


def test_training_lowers_the_denoising_loss(sd, image, trained):
    before = denoising_loss(sd, image, embedding_row(sd, trained.token_id), trained.token_id)
    after = denoising_loss(sd, image, trained.embedding.vector, trained.token_id)
    assert after < before * 0.995


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "sub" / "embedding.pt"
    trained.embedding.save(path)
    loaded = LearnedEmbedding.load(path)
    assert torch.equal(loaded.vector, trained.embedding.vector)
    assert dataclasses.replace(loaded, vector=None) == dataclasses.replace(trained.embedding, vector=None)
    assert [p.name for p in path.parent.iterdir()] == ["embedding.pt"]  # no temporary file left behind


def test_second_run_comes_from_the_cache(sd, image, tmp_path):
    cfg = small_config()
    calls = []
    first, cached = cached_or_train(sd, image, "hash-a", cfg, tmp_path, torch.Generator().manual_seed(0),
                                    lambda *a: calls.append(a))
    assert not cached and len(calls) == cfg.steps

    def must_not_train(*_):
        raise AssertionError("trained although the embedding was cached")

    second, cached = cached_or_train(sd, image, "hash-a", cfg, tmp_path, torch.Generator(), must_not_train)
    assert cached and torch.equal(second.vector, first.vector)


def test_cache_disabled_neither_reads_nor_writes(sd, image, tmp_path):
    cfg = small_config(steps=1, cache=False)
    _, cached = cached_or_train(sd, image, "hash-b", cfg, tmp_path, torch.Generator().manual_seed(0))
    assert not cached and not any(tmp_path.iterdir())


def test_cache_key_tracks_what_changes_the_result(sd):
    cfg = small_config()
    key = embedding_cache_key("hash-a", sd, cfg)
    assert key == embedding_cache_key("hash-a", sd, small_config())
    assert key != embedding_cache_key("hash-b", sd, cfg)
    assert key != embedding_cache_key("hash-a", dataclasses.replace(sd, model_id="another/model"), cfg)
    assert key != embedding_cache_key("hash-a", sd, small_config(steps=3))
    assert key != embedding_cache_key("hash-a", sd, small_config(learning_rate=1e-3))
