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
    # View-dependent prompts (DreamFusion): ", front view" / ", side view" / ", back view" / ", overhead view" /
    # ", bottom view" appended by the random camera's direction, against the Janus (many-faced) problem.
    view_prompts: bool = True
    # Use the direction's prompt on one step in N and the front one otherwise. The official RealFusion runs
    # did this (N = 10) as a side effect of their camera-replacement option; 1 = every step (DreamFusion).
    view_prompt_every: int = 1
    front_angle_deg: float = 60.0  # azimuths within +-30 deg of the reference are "front", +-30 of behind "back"
    overhead_angle_deg: float = 30.0  # polar angles below this are "overhead", above 180 - this "bottom"
    # How the UNet and VAE calls of SDS and textual inversion run (engine/guidance/fast_paths.py):
    # none (eager), compile (torch.compile, inductor), cudagraphs (torch.compile's CUDA-graph backend,
    # no code generation), compile-cudagraphs (inductor + CUDA graphs) or graphs (CUDA graphs captured
    # directly, seconds instead of torch.compile's tracing). CUDA only; the CPU runs eager.
    # graphs: measured on one H200 (bench/results/profile_prior_nvidia-h200.json), an SDS step 30 ms against 66 ms
    # eager (with the layout below), the textual-inversion step 77 against 115 ms; checked against eager by
    # bench/check_fastpaths.py.
    compile: str = "graphs"
    channels_last: bool = True  # NHWC convolutions for the UNet on CUDA (faster with fp16/bf16)
    # The VAE stays NCHW: its GroupNorms on NHWC tensors copy every activation to NCHW and back (a third of
    # an SDS step's kernel time on an H200, at 512 px); cuDNN's own transposes for NCHW convolutions cost less.
    vae_channels_last: bool = False
    vae_attention: str = "math"  # the VAE's attention: math (two matmuls) or sdpa (fast_paths.prior_modules)


@dataclass
class TextualInversionConfig:
    enabled: bool = True
    placeholder: str = "<e>"
    initializer: str = "object"  # a word naming the object ("bird", "mug"): where <e> starts (--initializer)
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
    weight_decay: float = 1e-2  # AdamW's, as the official code (which restores every other row after a step)
    resolution: int = 512  # augmentations are made at this size (the model's native one)
    # Which augmentation constants (engine.augment.AUGMENTATIONS): "official" follows lukemelas/realfusion
    # (rotation followed by a 5/6 center crop, i.e. a 1.5x zoom; color jitter 0.04); "gentle" fills the
    # rotation with white instead of zooming (the object keeps its edges) and jitters colors harder (0.2).
    augmentations: str = "official"
    cache: bool = True


@dataclass
class CameraConfig:
    # reference view: where the photo is assumed to be taken from
    ref_polar_deg: float = 75.0  # 90 - elevation 15
    ref_azimuth_deg: float = 0.0
    ref_radius: float = 1.8
    ref_fovy_deg: float = 55.0
    # Random views for the prior. The official ranges are radius 1.0-1.5 and fovy 40-70 deg around a box of
    # +-0.75. Our box is twice that (see FieldConfig.bound), so the cameras stand 2.4 times as far: the least
    # multiple that keeps every one of them outside the space the reference view allows the object in (the
    # box where it projects into the photo's frame; its back corners reach furthest: tested), with the focal
    # length scaled alike (tan(fovy/2) / 2.4) so that they frame the object as the official views do.
    radius_range: tuple[float, float] = (2.4, 3.6)
    fovy_range_deg: tuple[float, float] = (17.247, 32.530)  # 2 atan(tan(20 deg) / 2.4), 2 atan(tan(35 deg) / 2.4)
    polar_range_deg: tuple[float, float] = (0.0, 120.0)
    azimuth_range_deg: tuple[float, float] = (-180.0, 180.0)
    # Half the views uniform on the sphere, half uniform in the angles (which over-samples the poles).
    # As in the official code, the "uniform on the sphere" half comes from the upper hemisphere only
    # (polar <= uniform_sphere_max_polar_deg): views from below are ones a diffusion model judges poorly.
    uniform_sphere_rate: float = 0.5
    uniform_sphere_max_polar_deg: float = 90.0
    jitter: bool = False


@dataclass
class FieldConfig:
    # The field lives in [-bound, bound]^3. Matting frames the object at 80 % of the reference view, so its
    # extent across the view is about +-0.75 (the official box), but nothing in a photo limits its depth:
    # an object twice as deep as wide, seen head-on, spans about +-1.2 along the view axis. +-1.5 holds
    # objects up to about 2.4 times as deep as wide; the resolutions below are per box, so they are twice
    # the official per-box figures to keep the official per-meter detail (finest 1536 over 1.5 units).
    bound: float = 1.5
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19  # official 2^16 over a box of 1.5; 2^19 for eight times the volume
    base_resolution: int = 32
    finest_resolution: int = 3072
    hidden_dim: int = 64
    num_layers: int = 3
    # The official initial density bias (nerf/network_grid.py): blob_density * exp(-|x|^2 / (2 blob_radius^2)),
    # a soft opaque ball at the center, so fitting starts from "an object in the middle"; never negative,
    # so it does not fight the mask at the object's extremities.
    blob_density: float = 5.0
    blob_radius: float = 0.2
    backend: str = "auto"  # auto: Triton on CUDA, else tinycudann, else torch (fields.hashgrid.auto_backend)
    bg_hidden_dim: int = 32


@dataclass
class RenderConfig:
    # Ray marching as the official code (stable-dreamfusion's CUDA marcher): fixed steps of step_size world
    # units (2 sqrt(3) / 512: about 220 samples across the official box), samples in empty cells of the
    # occupancy grid skipped, and samples behind a transmittance of min_transmittance dropped.
    step_size: float = 0.006766  # 2 * sqrt(3) / 512
    max_samples: int = 1024  # per ray, a cap that only very long rays through the box reach
    min_transmittance: float = 1e-4  # samples behind this much remaining light are not evaluated
    occupancy_resolution: int = 128  # cells per side of the occupancy grid over the box
    occupancy_update_every: int = 16  # iterations between grid updates (the official code: 16)
    occupancy_decay: float = 0.95  # each update keeps max(decay * old, new density), as the official code
    # Occupied: density above min(this, the grid's mean density). Official: 10. In a box of 8 times the volume
    # that pruned thin parts for good (the mug's handle: F-score 0.87 against 0.975 at `demo`, measured on an
    # H200 with the oracle); 1 keeps every cell a surface can grow into.
    occupancy_threshold: float = 1.0
    # Cells within this many of an occupied one are marched too: the margin a surface grows into between
    # two updates (the official grid has none; without it a thin part far from the initial blob never forms).
    occupancy_dilation: int = 2
    # ... and never a cell at or below this many times the density of empty space (the grid's median). An
    # untrained field reads exp(0) = 1 everywhere: a haze that, half above the grid's mean, would fill the march
    # (and a CPU step) with samples. The haze drifts (LossConfig.empty_space says why), so the floor follows it;
    # 3 rather than 1.5 leaves the blob's faint shell out too (CPU demo: 22k samples a step against 40k at the
    # start). The dilation margin lets real surfaces grow past the blob all the same.
    occupancy_haze_ratio: float = 3.0
    normal_epsilon: float = 1e-2  # finite-difference step for normals, in world units
    normal_min_weight: float = 1e-4  # normals only where a sample's compositing weight exceeds this
    ref_resolution: int = 128
    random_resolution: int = 96
    albedo_only_fraction: float = 0.2  # first 1000 of 5000 iterations: albedo only
    shading_probs: tuple[float, float, float] = (0.2, 0.4, 0.4)  # albedo, lambertian, textureless afterwards
    ambient_ratio: float = 0.1
    # Lit views: the light sits at the camera's position plus N(0, light_jitter^2) (official: N(0, 1) at radii
    # 1-1.5; doubled with the radii).
    light_jitter: float = 2.0
    background: str = "mlp"  # mlp (learned, from view direction) or white


@dataclass
class LossConfig:
    # The prior's weight relative to the reference losses. Every official run used fp16 with a
    # torch.cuda.amp.GradScaler, and applied SDS by `latents.backward(gradient=grad)` *outside* the scaled loss,
    # so `scaler.step` divided the SDS gradient by the loss scale S while the other terms were unscaled back to
    # their weights: SDS was effectively weighted sds / S, with S = 2^16 at the start, doubling every 2000
    # overflow-free steps. Image 5, mask 0.5 and the rest were tuned under that attenuation. "gradscaler"
    # reproduces it as an explicit schedule (S doubles every sds_scale_growth_fraction of the iterations: 2000
    # of 5000); "constant" uses `sds` as it stands.
    sds: float = 1.0
    sds_schedule: str = "gradscaler"
    sds_initial_scale: float = 65536.0
    sds_scale_growth_fraction: float = 0.4
    image: float = 5.0
    mask: float = 0.5
    normal_smooth_2d: float = 0.5
    normal_blur_kernel: int = 9
    entropy: float = 1e-4
    orientation: float = 1e-2
    # Mean density at `empty_space_points` random points in the occupancy grid's empty cells. A hash grid
    # settles its collisions by the samples that reach each entry; the grid keeps haze out of the march, so
    # without this the object's samples alone would set the entries it shares with empty space, and empty
    # space fills with haze that crosses the grid's floor (CPU demo, figure, step 160: median haze 1.75, 10.6 %
    # of the box marched, mask loss 0.128 without it; 1.18, 4.3 % and 0.076 at weight 1, the haze receding).
    # The official grid marched its haze (threshold: the mean), which did the same job at the cost of all
    # those samples.
    empty_space: float = 1.0
    empty_space_points: int = 4096

    def sds_weight(self, step: int, iterations: int) -> float:
        """The SDS term's effective weight at `step` of `iterations` (see `sds_schedule`)."""
        if self.sds_schedule == "constant":
            return self.sds
        interval = max(1, round(self.sds_scale_growth_fraction * iterations))
        return self.sds / (self.sds_initial_scale * 2.0 ** (step // interval))


@dataclass
class FitConfig:
    iterations: int = 5000
    learning_rate: float = 1e-3
    grid_lr_multiplier: float = 10.0  # hash tables learn 10x faster, as InstantNGP / the official code
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    # The averaged weights that previews and the export use. Official: torch_ema updated once per 100-step
    # epoch with its default warm-up, min(0.95, (1 + n) / (10 + n)) at the n-th update (0.85 by the end of
    # 5000 steps): an average over the last ~700 steps. `standard` and `fast` average every step at 0.95.
    ema_decay: float = 0.95
    ema_every: int = 100
    ema_warmup: bool = True
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
    # Voids that no camera sees are filled (engine/export/mesh.py clean_occupancy). A fit leaves the inside of an
    # object as it was (nothing renders it), often below the surface's level and reached from outside through
    # pores in a never-seen wall: marching cubes then makes inner walls that no view shows and that halve
    # precision (box at `fast`, H200, oracle: F@0.02 0.57 -> 0.90, precision 0.77 -> 0.99 at this setting, 6
    # cells of 192; README, Quality). Filled: voids the surface encloses, and voids that close once the object
    # is grown by `cavity_closing` of the grid's side and that no axis-aligned line of sight reaches (0: only
    # the first).
    # Sealing voids at a quarter of the level instead measured no better.
    cavity_closing: float = 0.03
    # Whose lines of sight decide that a void is seen: "cameras" (directions toward the random views' band,
    # polar 0 to camera.polar_range_deg's end; every void none of them reaches is filled) or "axes" (the six
    # axis directions, straight below included, where no camera looks from; only voids the closing closes are
    # filled). Measured on the same fitted fields (H200, oracle, `fast`, bench/export_variants.py): box F@0.02
    # 0.84 -> 0.88 (RealFusion) and 0.59 -> 0.94 (ConRad), the figure's ConRad 0.78 -> 0.82; the figure's
    # RealFusion 0.962 -> 0.955, the rest within 0.01. The figure at `demo` on a CPU: 0.73 -> 0.80.
    cavity_sight: str = "cameras"


@dataclass
class ConRadConfig:
    """ConRad's image-constrained field (`--method conrad`, engine/fields/constrained.py): points on or in front
    of the visible surface take the photo's color. The surface depth is estimated from the field itself."""

    # weight of the color image loss (ConRad: none, the reference view matches by construction). Through
    # the constrained colors it reaches only the density: inside the mask it asks for opacity, weighted by
    # how far the object's color is from the background
    image_loss: float = 0.0
    delta: float = 0.03  # margin behind the estimated surface depth that still takes the photo's color (world units)
    # the surface is where a reference ray's normalised transmittance falls to this. ConRad's 0.05 (`paper`)
    # puts it where 95 % of the ray's opacity is reached: behind a surface the fit has not made opaque yet
    # (a thin part early on, the bird's beak), so the photo's color is painted onto what lies behind it.
    # `standard`/`fast` take the median, 0.5 (_ours)
    depth_threshold: float = 0.05
    depth_refresh_every: int = 10  # re-estimate the surface depth from the field every N fit iterations
    depth_resolution: int = 0  # pixels a side of the depth map during the fit (0: render.ref_resolution)
    depth_samples: int = 128  # equal steps per reference ray, entry to exit of the box, for the depth
    # what a point in front of the surface takes where the photo shows no object: "background" (ConRad: the
    # photo's own pixel, white) or "field" (its own albedo; a mesh a little wider than the mask then shows no
    # background-colored band on its sides in other views)
    outside_mask: str = "background"
    outline_dilation_px: int = 0  # the export matches the mesh's outline to the mask grown by this many photo pixels


@dataclass
class ReconstructionConfig:
    method: str = "realfusion"  # realfusion or conrad (engine/methods)
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
    conrad: ConRadConfig = _section(ConRadConfig)

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
    """What the official runs effectively did (shared/README.md), except where a comment says otherwise."""
    cfg = ReconstructionConfig()
    cfg.prior.view_prompt_every = 10  # their direction prompt on one step in ten, "front" on the others
    return cfg


def _ours(cfg: ReconstructionConfig) -> ReconstructionConfig:
    """What `standard` and `fast` change from `paper` besides sizes: the direction's prompt on every step
    (DreamFusion's remedy for the Janus problem) and augmentations that keep the whole object in view."""
    cfg.prior.view_prompt_every = 1
    cfg.textual_inversion.augmentations = "gentle"
    cfg.fit.ema_every, cfg.fit.ema_warmup = 1, False
    # ConRad's surface at half the ray's opacity, not 95 %: oracle harness on one H200, 4 objects, 0.05 -> 0.5:
    # `fast` mesh reference PSNR 27.3/30.1/34.9/24.2 -> 32.4/30.6/30.6/25.9 dB (box/mug/figure/bird), novel
    # views 23.5/31.6/27.8/20.9 -> 25.8/29.4/27.0/23.8 dB, F@0.05 figure 0.85 -> 0.95; `demo` F@0.05 box
    # 0.87 -> 1.00 (bench/results/methods_nvidia-h200_s22*; README, Methods)
    cfg.conrad.depth_threshold = 0.5
    return cfg


def _standard() -> ReconstructionConfig:
    cfg = _ours(ReconstructionConfig())
    cfg.textual_inversion.steps = 1500
    cfg.fit.iterations = 3000
    cfg.fit.preview_every = 200
    return cfg


def _fast() -> ReconstructionConfig:
    cfg = _ours(ReconstructionConfig())
    cfg.textual_inversion.steps = 500
    cfg.textual_inversion.grad_accumulation = 1
    cfg.textual_inversion.batch_size = 4
    cfg.fit.iterations = 1200
    cfg.fit.preview_every = 100
    cfg.fit.checkpoint_every = 200
    cfg.render.random_resolution = 64
    cfg.render.ref_resolution = 96
    cfg.export.resolution = 192
    cfg.export.texture_size = 1024
    cfg.export.max_faces = 30000
    return cfg


def _demo() -> ReconstructionConfig:
    """CPU-sized, for `realfusion demo`: the oracle prior needs no textual inversion."""
    cfg = _ours(ReconstructionConfig())
    cfg.matting.image_size = 256
    cfg.textual_inversion.enabled = False
    cfg.fit.iterations = 1000  # oracle on the figure: 29 dB novel views, silhouette IoU 0.98 (400: 21 dB, 0.95)
    cfg.fit.preview_every = 100
    cfg.fit.checkpoint_every = 100
    cfg.fit.coarse_levels_masked = 2
    cfg.fit.turntable_resolution = 64
    cfg.field.n_levels = 8
    cfg.field.log2_hashmap_size = 15
    cfg.field.finest_resolution = 256
    # Four times the official step (about 110 steps across the box, 55 across the object) and a coarser
    # occupancy grid: the CPU cost of a step is the samples it evaluates.
    cfg.render.step_size = 4 * 0.006766
    cfg.render.occupancy_resolution = 64
    cfg.render.random_resolution = 32
    cfg.render.ref_resolution = 48
    # The outline of a 128^3 mesh missed the mask by a cell (1/85 of the box) around the object. The same fitted
    # fields exported at 192 (2-core CPU, bench/results/harness/demo_export_resolution_cpu.json): ConRad's box
    # mesh reference view 28.8 -> 30.5 dB (IoU 0.978 -> 0.982, novel 23.4 -> 23.9), RealFusion's figure 30.0 ->
    # 30.9 dB (novel 28.46 -> 28.57); 256 added 0.1-0.4 dB more for twice the export time.
    cfg.export.resolution = 192
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
                 model: str | None = None, initializer: str | None = None) -> ReconstructionConfig:
    """A preset with a seed, a method, an optional prior model, the word naming the object, and
    ``section.key=value`` overrides."""
    cfg = preset(preset_name)
    cfg.seed = seed
    cfg.method = method
    if model:
        cfg.prior.model = model
    if initializer and initializer.strip():
        cfg.textual_inversion.initializer = check_initializer(initializer)
    return apply_overrides(cfg, list(overrides))


def check_initializer(word: str) -> str:
    """The word naming the object, as textual inversion's starting point: one plain word."""
    word = word.strip()
    if not word or len(word) > 40 or not all(c.isalpha() or c in "-'" for c in word):
        raise ConfigError(f"The object name {word!r} is not one plain word.",
                          "Name the object with one word, such as bird, mug or chair (or leave it empty).")
    return word.lower()


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
