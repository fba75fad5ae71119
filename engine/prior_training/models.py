"""The learned prior's parts, built from small configs in Stable Diffusion's layout (as tests/tiny_sd.py does).

64 px images, a VAE that halves twice (latents 16 x 16 x 4, so `StableDiffusion.resolution` is 64), a UNet with
cross-attention on a 64-wide CLIP text encoder, and a word-level BPE vocabulary written offline: every word of
the world's captions is one token, so the textual-inversion initializer ("cube") is one row of the table.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .world import VOCABULARY

TEXT_WIDTH = 64


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: merge the lowest-ranked adjacent pair until none is known."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def vocab_and_merges(words=VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """Letters, and merges that make each word one token. A merge is only ever appended (lowest priority), where
    a word does not yet come out whole, so it cannot change how an earlier word is split."""
    tokens = ["<|startoftext|>", "<|endoftext|>", "!", ",", ",</w>"]
    tokens += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges: list[tuple[str, str]] = []
    for word in words:
        while len(pieces := _bpe(word, {pair: i for i, pair in enumerate(merges)})) > 1:
            merges.append((pieces[0], pieces[1]))
            if pieces[0] + pieces[1] not in tokens:
                tokens.append(pieces[0] + pieces[1])
    return {tok: i for i, tok in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


MAX_TOKENS = 16  # the longest caption is 12 tokens with its start and end; the pipeline pads to this


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


# Sizes: "base" (64 px images, latents 16 x 16: the GPU model), "small" (32 px, latents 8 x 8: trainable on a
# CPU in about half an hour), "tiny" (smoke tests only).
IMAGE_SIZE = {"base": 64, "small": 32, "tiny": 32}


def text_encoder(vocab_size: int, size: str = "base") -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers={"base": 3, "small": 2, "tiny": 1}[size], num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def unet(size: str = "base") -> UNet2DConditionModel:
    channels, layers, heads, groups = {"base": ((64, 128, 128), 2, 8, 32), "small": ((32, 64, 96), 1, 4, 16),
                                       "tiny": ((32, 32, 32), 1, 4, 8)}[size]
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE[size] // 4, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=heads, norm_num_groups=groups)


def vae(size: str = "base") -> AutoencoderKL:
    channels, groups = {"base": ((32, 64, 64), 16), "small": ((16, 32, 32), 8), "tiny": ((16, 16, 16), 8)}[size]
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=groups, sample_size=IMAGE_SIZE[size])


def scheduler() -> DDPMScheduler:
    """Stable Diffusion's noise schedule (what the SDS code and the oracle assume), and its clip_sample=False: latents
    of unit variance are not bounded by 1 (clipping them ruins DDIM samples)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False)


def model_index() -> dict:
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "image_encoder": [None, None],
            "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}
