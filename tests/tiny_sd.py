"""A tiny, randomly initialised Stable Diffusion folder for CPU tests.

It has the same layout as a real checkpoint (unet/, vae/, text_encoder/, tokenizer/,
scheduler/), so tests load it through `load_stable_diffusion` exactly as real weights are.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HIDDEN = 32  # text width = UNet cross-attention width
# Whole-word tokens the tests' prompts use, so they encode to one token each.
WORDS = ("an", "image", "of", "a", "object", "photo", "the")


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"]
    tokens += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = []
    for word in WORDS:
        if len(word) == 1:
            continue  # single letters already exist as "x</w>"
        # Left-to-right BPE merges: "i m" -> "im", "im a" -> "ima", ..., last piece carries </w>.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            if merged not in tokens:
                tokens.append(merged)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _write_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=4, norm_num_groups=8,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    )


def _text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=HIDDEN,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModel(config)


def build_tiny_stable_diffusion(path: str | Path) -> Path:
    """Write a 32 px Stable Diffusion (latent 16x16x4, text width 32) to `path`; return it."""
    path = Path(path)
    torch.manual_seed(0)
    tokenizer = _write_tokenizer(path / "tokenizer")
    _text_encoder(len(tokenizer)).save_pretrained(str(path / "text_encoder"))
    _unet().save_pretrained(str(path / "unet"))
    _vae().save_pretrained(str(path / "vae"))
    DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    ).save_pretrained(str(path / "scheduler"))
    return path
