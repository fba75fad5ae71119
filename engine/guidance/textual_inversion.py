"""Single-image textual inversion (eq. (2) of RealFusion).

A new token <e> gets one learned text-embedding row e, fitted so that the frozen diffusion
model reconstructs heavily augmented copies of the one input image when prompted with
"an image of a <e>":  e* = argmin_e E_{t, eps, aug} || eps_hat(z_t; "an image of a <e>", t) - eps ||^2.
Only that row trains; the text encoder, UNet and VAE never change. The learned vector
never gets written into the shared text encoder either: a forward hook on the input
embedding layer substitutes it at the placeholder's positions, so one loaded model can
serve many jobs (one at a time) with different embeddings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from engine.augment import augment_batch, augmentation_config
from engine.config import PriorConfig, TextualInversionConfig
from engine.device import to_device
from engine.errors import EngineError
from engine.guidance.fast_paths import modules_for, prior_modules
from engine.guidance.stable_diffusion import StableDiffusion, sample_normal

FORMAT_VERSION = 1  # bump when the training recipe changes, so old cache entries are not reused

Progress = Callable[[int, float], None]


def add_placeholder_token(sd: StableDiffusion, placeholder: str = "<e>", initializer: str = "object") -> int:
    """Add `placeholder` to the tokenizer (idempotent), grow the embedding table, return its id.

    The new row starts as the initializer word's (first token's) embedding, so the prompt
    means "an image of a object" before any training.
    """
    tokenizer, encoder = sd.tokenizer, sd.text_encoder
    if placeholder in tokenizer.get_vocab() and placeholder not in tokenizer.get_added_vocab():
        # Reusing a vocabulary token would overwrite its row in the shared text encoder.
        raise EngineError(f"The placeholder {placeholder!r} is already a token of the model's vocabulary.",
                          "Pick a string that is not a word, e.g. textual_inversion.placeholder=<e>.")
    tokenizer.add_tokens(placeholder)
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if not init_ids:
        raise EngineError(f"The initializer word {initializer!r} encodes to no token.",
                          "Use a plain word such as textual_inversion.initializer=object.")
    if encoder.get_input_embeddings().num_embeddings < len(tokenizer):
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # row is set just below
        encoder.requires_grad_(False)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[token_id] = table[init_ids[0]]
    return token_id


@contextlib.contextmanager
def _substitute(sd: StableDiffusion, vector: torch.Tensor | None, token_id: int | None):
    """While active, the embedding layer outputs `vector` wherever the input id is `token_id`."""
    if vector is None or token_id is None:
        yield
        return

    def hook(_module, inputs, output):
        mask = (inputs[0] == token_id).unsqueeze(-1)
        return torch.where(mask, vector.to(output.dtype), output)

    handle = sd.text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _token_ids(sd: StableDiffusion, prompt: str) -> torch.Tensor:
    return sd.tokenizer(prompt, padding="max_length", max_length=sd.tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(sd.device)


def encode_prompt(sd: StableDiffusion, prompt: str, learned_embedding: torch.Tensor | None = None,
                  placeholder_id: int | None = None) -> torch.Tensor:
    """[1, 77, D] text conditioning; gradient flows into `learned_embedding` (not under no_grad)."""
    return prompt_encoder(sd, prompt, placeholder_id)(learned_embedding)


def prompt_encoder(sd: StableDiffusion, prompt: str, placeholder_id: int | None) -> Callable:
    """learned embedding [D] -> [1, 77, D] conditioning of `prompt`, its token ids made once (on the device,
    so the call does nothing on the host and can be captured as a CUDA graph)."""
    ids = _token_ids(sd, prompt)

    def encode(learned_embedding: torch.Tensor | None) -> torch.Tensor:
        with _substitute(sd, learned_embedding, placeholder_id):
            return sd.text_encoder(ids)[0]

    return encode


@torch.no_grad()
def text_embeddings_for_guidance(sd: StableDiffusion, prompt: str, learned_embedding: torch.Tensor | None,
                                 placeholder_id: int | None) -> torch.Tensor:
    """[2, 77, D]: (unconditional "", conditional prompt), the layout SDS guidance expects."""
    uncond = encode_prompt(sd, "")
    cond = encode_prompt(sd, prompt, learned_embedding, placeholder_id)
    return torch.cat([uncond, cond])


@dataclass
class LearnedEmbedding:
    vector: torch.Tensor  # [D] cpu float32
    placeholder: str
    initializer: str
    model_id: str
    steps: int
    final_loss: float  # mean loss over the last steps (single-step losses are very noisy)
    losses: list[float] = field(default_factory=list)  # one per optimizer step

    def save(self, path: str | Path) -> None:
        """Atomic: a crash mid-write never leaves a truncated file that looks like a cache hit."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self) | {"vector": self.vector.detach().cpu().float(), "format": FORMAT_VERSION}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(data, handle)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "LearnedEmbedding":
        data = torch.load(path, map_location="cpu", weights_only=True)
        data.pop("format", None)
        return cls(**data)


def train_embedding(sd: StableDiffusion, image: torch.Tensor, cfg: TextualInversionConfig,
                    generator: torch.Generator, progress: Progress | None = None,
                    check_cancel: Callable[[], None] | None = None,
                    execution: PriorConfig | None = None) -> LearnedEmbedding:
    """Fit the placeholder's embedding to `image` ([3,H,W] in [0,1], object on white).

    One step = `grad_accumulation` micro-batches of `batch_size` augmented views, then one
    AdamW update (constant lr, as the official recipe); `progress(step, loss)` after each.
    `check_cancel()` runs before every micro-batch and raises to stop (a step can take minutes on a CPU).
    With `cfg.accumulate_as_batch` the micro-batches run as one batch of batch_size x
    grad_accumulation views: the same mean loss and gradient (tests/test_fast_paths.py) in one
    UNet call instead of several, which is most of the time on a GPU (the calls are
    launch-bound). `execution` (the prior's settings: compile mode, layouts; default eager) picks how the
    UNet, VAE and text encoder run (engine/guidance/fast_paths.py).

    Nothing in a step waits for the GPU: the random draws reach it through pinned memory, the fused
    AdamW on CUDA takes the GradScaler's overflow flag on the device (no host check), and each step's
    loss is read after the next step is queued.
    """
    modules = modules_for(sd, execution)
    token_id = add_placeholder_token(sd, cfg.placeholder, cfg.initializer)
    initial = sd.text_encoder.get_input_embeddings().weight[token_id].detach().float()
    vector = torch.nn.Parameter(initial.clone())  # float32 master copy, cast for the forward
    optimizer = torch.optim.AdamW([vector], lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=sd.device.type == "cuda")
    # fp16 weights on CUDA: scale the loss so the row's small gradients survive half precision.
    scaler = torch.amp.GradScaler(sd.device.type, enabled=sd.dtype == torch.float16)
    prompt = cfg.prompt.format(cfg.placeholder)
    encode = modules.graphed(prompt_encoder(sd, prompt, token_id))
    # The augmentations run where the model is (torch ops; their random draws stay on `generator`).
    image = image.detach().float().to(sd.device)
    micro_batches, micro_size = cfg.grad_accumulation, cfg.batch_size
    if cfg.accumulate_as_batch:
        micro_batches, micro_size = 1, cfg.batch_size * cfg.grad_accumulation
    losses: list[float] = []

    def read(step: int, loss: torch.Tensor) -> None:
        losses.append(float(loss))
        if progress is not None:
            progress(step, losses[-1])

    queued = None  # (step, loss on the device) of the step before
    for step in range(cfg.steps):
        loss = torch.zeros((), device=sd.device)
        for _ in range(micro_batches):
            if check_cancel is not None:
                check_cancel()
            modules.begin_step()
            latents, t, noise = training_batch(sd, image, cfg.resolution, micro_size, generator, modules,
                                               augmentation_config(cfg.augmentations))
            micro = denoising_loss(sd, latents, t, noise, vector, token_id, prompt, modules, encode) / micro_batches
            scaler.scale(micro).backward()
            loss += micro.detach()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if queued is not None:
            read(*queued)
        queued = (step, loss)
    if queued is not None:
        read(*queued)
    tail = losses[-max(1, min(100, len(losses) // 10)):] if losses else [float("nan")]
    return LearnedEmbedding(vector=vector.detach().cpu().clone(), placeholder=cfg.placeholder,
                            initializer=cfg.initializer, model_id=sd.model_id, steps=cfg.steps,
                            final_loss=sum(tail) / len(tail), losses=losses)


def training_batch(sd: StableDiffusion, image: torch.Tensor, resolution: int, batch_size: int,
                   generator: torch.Generator, modules=None,
                   augmentations=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fresh batch for eq. (2): latents of `batch_size` augmented views, their t and noise (float32)."""
    modules = modules or prior_modules(sd, "none")
    views = augment_batch(image.to(sd.device), resolution, batch_size, generator, augmentations)
    with torch.no_grad():
        latents = modules.encode_latents((views * 2.0 - 1.0).to(sd.dtype), generator).float()
    total = sd.num_train_timesteps
    t = to_device(torch.randint(0, total, (latents.shape[0],), generator=generator, device=generator.device), sd.device)
    noise = sample_normal(latents.shape, generator, sd.device)
    return latents, t, noise


def denoising_loss(sd: StableDiffusion, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   vector: torch.Tensor, token_id: int, prompt: str, modules=None,
                   encode: Callable | None = None) -> torch.Tensor:
    """Eq. (2) on one batch: || eps_hat(z_t; prompt(e), t) - eps ||^2, mean over the batch's elements.
    `encode` is `prompt_encoder(sd, prompt, token_id)` made once (default: made here)."""
    modules = modules or prior_modules(sd, "none")
    noisy = sd.scheduler.add_noise(latents, noise, t).to(sd.dtype)
    encode = encode or prompt_encoder(sd, prompt, token_id)
    context = encode(vector).expand(latents.shape[0], -1, -1)
    eps = modules.unet(noisy, t, context)
    return F.mse_loss(eps.float(), noise)


def embedding_cache_key(content_hash: str, sd: StableDiffusion, cfg: TextualInversionConfig) -> str:
    """Everything that changes the learned vector: the image, the model, the recipe."""
    fields = {name: getattr(cfg, name) for name in (
        "steps", "learning_rate", "batch_size", "grad_accumulation", "accumulate_as_batch", "resolution",
        "placeholder", "initializer", "prompt", "augmentations", "weight_decay")}
    payload = {"image": content_hash, "model": sd.model_id, "format": FORMAT_VERSION, **fields}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_or_train(sd: StableDiffusion, image: torch.Tensor, content_hash: str, cfg: TextualInversionConfig,
                    cache_dir: Path, generator: torch.Generator, progress: Progress | None = None,
                    check_cancel: Callable[[], None] | None = None,
                    execution: PriorConfig | None = None) -> tuple[LearnedEmbedding, bool]:
    """The cached embedding for this image/model/recipe if there is one (True), else train it (False).

    Textual inversion is the longest phase (about an hour at paper settings), so re-running
    an object with other reconstruction settings should never repeat it.
    """
    path = Path(cache_dir) / f"{embedding_cache_key(content_hash, sd, cfg)}.pt"
    if cfg.cache and path.is_file():
        with contextlib.suppress(Exception):  # unreadable entry (old format, disk trouble): retrain
            return LearnedEmbedding.load(path), True
    embedding = train_embedding(sd, image, cfg, generator, progress, check_cancel, execution=execution)
    if cfg.cache:
        embedding.save(path)
    return embedding, False
