"""Every hyper-parameter of a reconstruction, in one typed tree with named presets.

`paper` reproduces the official RealFusion settings (lukemelas/realfusion, see
shared/README.md); `standard` and `fast` are ours, trading quality for time.
A config is plain data: it round-trips through JSON and is written next to every result.
Overrides use dotted paths, e.g. ``fit.iterations=200`` (see `apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass

from .errors import ConfigError


def _section(cls):
    return dataclasses.field(default_factory=cls)


@dataclass
class MattingConfig:
    image_size: int = 512  # side of the square reference image handed to the later stages
    object_fraction: float = 0.8  # longest side of the object's bounding box, as a fraction of the frame
    alpha_threshold: float = 0.5  # alpha above this counts as object when measuring its box
    min_input_size: int = 64  # smaller inputs carry too little to reconstruct from
    min_object_fraction: float = 0.005  # an alpha mask covering less than this is "no object found"


@dataclass
class PriorConfig:
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or local folder
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU; or fp16 / bf16 / fp32
    guidance_scale: float = 100.0
    t_range: tuple[float, float] = (0.02, 0.98)
    weighting: str = "sds"  # w(t) = 1 - alpha_bar(t), as DreamFusion
    render_to_model_resolution: bool = True  # upsample renders to the VAE's native size
    # How the UNet and VAE calls of SDS and textual inversion run (engine/guidance/fast_paths.py):
    # none (eager), compile (torch.compile, inductor), cudagraphs (torch.compile's CUDA-graph backend,
    # no code generation) or compile-cudagraphs (inductor + CUDA graphs). CUDA only; the CPU runs eager.
    compile: str = "none"
    channels_last: bool = True  # NHWC convolutions for the UNet and VAE on CUDA (faster with fp16/bf16)


@dataclass
class TextualInversionConfig:
    enabled: bool = True
    placeholder: str = "<e>"
    initializer: str = "object"
    prompt: str = "an image of a {}"
    steps: int = 3000
    batch_size: int = 1
    grad_accumulation: int = 4
    # Execution, not recipe: run the grad_accumulation micro-batches as one batch of batch_size x
    # grad_accumulation views (same mean loss and gradient, one UNet call: 3x faster on a GPU).
    # The learned vector differs from an accumulated run's only because the random draws come in
    # another order; False runs the micro-batches one after the other (less memory).
    accumulate_as_batch: bool = True
    learning_rate: float = 2e-3  # 5e-4 scaled by batch x accumulation, as the official code
    resolution: int = 512  # augmentations are made at this size (the model's native one)
    cache: bool = True


@dataclass
class CameraConfig:
    # reference view: where the photo is assumed to be taken from
    ref_polar_deg: float = 75.0  # 90 - elevation 15
    ref_azimuth_deg: float = 0.0
    ref_radius: float = 1.8
    ref_fovy_deg: float = 55.0
    # random views for the prior
    radius_range: tuple[float, float] = (1.0, 1.5)
    fovy_range_deg: tuple[float, float] = (40.0, 70.0)
    polar_range_deg: tuple[float, float] = (0.0, 120.0)
    azimuth_range_deg: tuple[float, float] = (-180.0, 180.0)
    uniform_sphere_rate: float = 0.5  # half the views uniform on the sphere, half uniform in angles
    jitter: bool = False


@dataclass
class FieldConfig:
    bound: float = 0.75  # the field lives in [-bound, bound]^3
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    finest_resolution: int = 2048
    hidden_dim: int = 64
    num_layers: int = 3
    # DreamFusion's initial density bias, blob_density * (1 - |x| / blob_radius): an opaque ball at the
    # center that fades out past blob_radius, so fitting starts from "an object in the middle".
    blob_density: float = 5.0
    blob_radius: float = 0.5
    backend: str = "auto"  # auto: tinycudann when it imports (and on CUDA), else triton on CUDA, else torch
    bg_hidden_dim: int = 32


@dataclass
class RenderConfig:
    num_samples: int = 64  # samples per ray inside the bound
    normal_epsilon: float = 1e-2  # finite-difference step for normals, in world units
    normal_min_weight: float = 1e-4  # normals only where a sample's compositing weight exceeds this
    ref_resolution: int = 128
    random_resolution: int = 96
    albedo_only_fraction: float = 0.2  # first 1000 of 5000 iterations: albedo only
    shading_probs: tuple[float, float, float] = (0.2, 0.4, 0.4)  # albedo, lambertian, textureless afterwards
    ambient_ratio: float = 0.1
    background: str = "mlp"  # mlp (learned, from view direction) or white


@dataclass
class LossConfig:
    sds: float = 1.0
    image: float = 5.0
    mask: float = 0.5
    normal_smooth_2d: float = 0.5
    normal_blur_kernel: int = 9
    entropy: float = 1e-4
    orientation: float = 1e-2


@dataclass
class FitConfig:
    iterations: int = 5000
    learning_rate: float = 1e-3
    grid_lr_multiplier: float = 10.0  # hash tables learn 10x faster, as InstantNGP / the official code
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    ema_decay: float = 0.95
    coarse_to_fine_fraction: float = 0.6  # first 60% (3000 of 5000) iterations with the top levels masked
    coarse_levels_masked: int = 8
    ref_view_every: int = 1  # reference-view losses every N iterations (the official code: every one)
    preview_every: int = 250
    checkpoint_every: int = 500
    turntable_views: int = 8
    turntable_resolution: int = 128


@dataclass
class ExportConfig:
    """The mesh handed to Blender: marching cubes on the density, cleaned, unwrapped and textured."""

    enabled: bool = True  # export at the end of `reconstruct` (`realfusion export` runs it again)
    format: str = "glb"  # glb (one file, with the reference camera) or obj (+ .mtl + texture png)
    resolution: int = 256  # marching-cubes grid points per side of the field's box
    texture_size: int = 2048  # side of the square albedo texture, in pixels
    max_faces: int = 50000  # decimate to this many triangles (0: keep every face)
    vertex_colors: bool = False  # albedo on the vertices instead of a texture: quicker, for a first look
    object_size_m: float = 1.0  # the object's longest side in meters (0: keep the field's units)
    origin: str = "center"  # center (box center at the origin) or bottom (centered, resting on z = 0)
    min_component_fraction: float = 0.1  # parts smaller than this fraction of the largest are floaters


@dataclass
class ReconstructionConfig:
    method: str = "realfusion"
    seed: int = 0
    matting: MattingConfig = _section(MattingConfig)
    prior: PriorConfig = _section(PriorConfig)
    textual_inversion: TextualInversionConfig = _section(TextualInversionConfig)
    camera: CameraConfig = _section(CameraConfig)
    field: FieldConfig = _section(FieldConfig)
    render: RenderConfig = _section(RenderConfig)
    loss: LossConfig = _section(LossConfig)
    fit: FitConfig = _section(FitConfig)
    export: ExportConfig = _section(ExportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "ReconstructionConfig":
        return _from_dict(cls, data)


def _from_dict(cls, data: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _paper() -> ReconstructionConfig:
    return ReconstructionConfig()


def _standard() -> ReconstructionConfig:
    cfg = ReconstructionConfig()
    cfg.textual_inversion.steps = 1500
    cfg.fit.iterations = 3000
    cfg.fit.preview_every = 200
    return cfg


def _fast() -> ReconstructionConfig:
    cfg = ReconstructionConfig()
    cfg.textual_inversion.steps = 500
    cfg.textual_inversion.grad_accumulation = 1
    cfg.textual_inversion.batch_size = 4
    cfg.fit.iterations = 1200
    cfg.fit.preview_every = 100
    cfg.fit.checkpoint_every = 200
    cfg.render.num_samples = 48
    cfg.render.random_resolution = 64
    cfg.render.ref_resolution = 96
    cfg.export.resolution = 192
    cfg.export.texture_size = 1024
    cfg.export.max_faces = 30000
    return cfg


def _demo() -> ReconstructionConfig:
    """CPU-sized, for `realfusion demo`: the oracle prior needs no textual inversion."""
    cfg = ReconstructionConfig()
    cfg.matting.image_size = 256
    cfg.textual_inversion.enabled = False
    cfg.fit.iterations = 1000  # oracle on the figure: 29 dB novel views, silhouette IoU 0.98 (400: 21 dB, 0.95)
    cfg.fit.preview_every = 100
    cfg.fit.checkpoint_every = 100
    cfg.fit.coarse_levels_masked = 2
    cfg.fit.turntable_resolution = 64
    cfg.field.n_levels = 8
    cfg.field.log2_hashmap_size = 14
    cfg.field.finest_resolution = 128
    cfg.render.num_samples = 32
    cfg.render.random_resolution = 32
    cfg.render.ref_resolution = 48
    cfg.export.resolution = 128
    cfg.export.texture_size = 512
    cfg.export.max_faces = 20000
    return cfg


PRESETS: dict[str, typing.Callable[[], ReconstructionConfig]] = {  # for photos
    "fast": _fast,
    "standard": _standard,
    "paper": _paper,
}


# `realfusion demo` only: sized for a CPU, and without textual inversion (the oracle prior needs none).
DEMO_PRESETS: dict[str, typing.Callable[[], ReconstructionConfig]] = {"demo": _demo, **PRESETS}


def preset(name: str) -> ReconstructionConfig:
    if name not in DEMO_PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; the presets are {', '.join(PRESETS)}.")
    return DEMO_PRESETS[name]()


def build_config(preset_name: str, overrides: list[str] = (), *, seed: int = 0, method: str = "realfusion",
                 model: str | None = None) -> ReconstructionConfig:
    """A preset with a seed, a method, an optional prior model and ``section.key=value`` overrides."""
    cfg = preset(preset_name)
    cfg.seed = seed
    cfg.method = method
    if model:
        cfg.prior.model = model
    return apply_overrides(cfg, list(overrides))


def apply_overrides(cfg: ReconstructionConfig, overrides: list[str]) -> ReconstructionConfig:
    """Apply ``section.key=value`` strings; values are parsed as JSON where they can be."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = path.strip().split(".")
        target = cfg
        for name in parents:
            if not dataclasses.is_dataclass(target) or not hasattr(target, name):
                raise ConfigError(f"override {item!r}: no config section {name!r}")
            target = getattr(target, name)
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"override {item!r}: no setting {leaf!r} in {type(target).__name__}")
        setattr(target, leaf, _parse_like(raw, getattr(target, leaf), item))
    return cfg


def _parse_like(raw: str, current, item: str):
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"override {item!r}: expected true or false")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, list) or len(value) != len(current):
            raise ConfigError(f"override {item!r}: expected a list of {len(current)} numbers")
        return tuple(value)
    if isinstance(current, (int, float)) and not isinstance(value, (int, float)):
        raise ConfigError(f"override {item!r}: expected a number")
    if isinstance(current, int) and isinstance(value, float):
        raise ConfigError(f"override {item!r}: expected a whole number")
    if isinstance(current, float):
        return float(value)
    if isinstance(current, str):
        return str(raw)
    return value
