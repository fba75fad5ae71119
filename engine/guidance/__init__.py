"""The diffusion prior: Stable Diffusion loading, SDS guidance and textual inversion."""

from engine.guidance.stable_diffusion import (
    GuidanceOutput,
    StableDiffusion,
    StableDiffusionGuidance,
    load_stable_diffusion,
    resolve_dtype,
)
from engine.guidance.textual_inversion import (
    LearnedEmbedding,
    add_placeholder_token,
    cached_or_train,
    embedding_cache_key,
    encode_prompt,
    text_embeddings_for_guidance,
    train_embedding,
)

__all__ = [
    "GuidanceOutput",
    "LearnedEmbedding",
    "StableDiffusion",
    "StableDiffusionGuidance",
    "add_placeholder_token",
    "cached_or_train",
    "embedding_cache_key",
    "encode_prompt",
    "load_stable_diffusion",
    "resolve_dtype",
    "text_embeddings_for_guidance",
    "train_embedding",
]
