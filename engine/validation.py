"""One check of a whole reconstruction config, before any work starts (the CLI and the job server share it).

`build_config` parses overrides "like the default" (a number stays a number), but it cannot know that
`render.num_samples=0` divides by zero ten minutes later or that `fit.betas=["a","b"]` is not numbers.
`validate_config` walks every setting once: its type (inside tuples too), its range, its allowed names,
the settings that must agree with each other (the prompt's placeholder, the export's own checks).
Every problem found is named in one `InvalidSettings` error, with the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import typing

from .config import ReconstructionConfig, build_config
from .errors import EngineError

SEED_MAX = 2**32 - 1  # numpy's and torch's generators both take seeds up to here
# the object's name for textual inversion (its first token starts the learned embedding): one plain word
INITIALIZER_PATTERN = r"^[A-Za-z][A-Za-z'-]{0,31}$"
FIELD_BACKENDS = ("auto", "torch", "tcnn", "triton")  # engine.fields.hashgrid.make_hash_grid
RENDER_BACKGROUNDS = ("mlp", "white")  # engine.system: an MLP of the view direction, or plain white
MAX_PROBLEMS_SHOWN = 6


def known_methods() -> tuple[str, ...]:
    """The reconstruction methods this engine runs: the one place that says where that list lives."""
    from .methods import METHODS

    return tuple(METHODS)


class InvalidSettings(EngineError):
    """A setting (preset, seed, method or override) the engine cannot run with; nothing was started."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
        super().__init__(f"Invalid settings: {'; '.join(shown)}{more}.",
                         "Change those values (--set SECTION.KEY=VALUE, or the job's overrides); "
                         "config.json in any output folder lists every setting with a working value.")
        self.problems = problems


def checked_config(preset_name: str, overrides: list[str] = (), *, seed: int = 0, method: str = "realfusion",
                   model: str | None = None, initializer: str | None = None) -> ReconstructionConfig:
    """build_config, then the initializer word (None or "": the preset's), then validate_config."""
    cfg = build_config(preset_name, overrides, seed=seed, method=method, model=model)
    if initializer:
        cfg.textual_inversion.initializer = initializer
    validate_config(cfg)
    return cfg


def validate_config(cfg: ReconstructionConfig) -> None:
    """Raise InvalidSettings naming every bad setting of `cfg`; return None when it can run."""
    problems = _type_problems(cfg, "")
    if not problems:  # ranges compare values: only once every value has its type
        problems = _value_problems(cfg) + (_export_problems(cfg) if cfg.export.enabled else [])
    if problems:
        raise InvalidSettings(problems)


# ---------------------------------------------------------------------------------------------------- types

def _type_problems(section, prefix: str) -> list[str]:
    problems = []
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        name, value, hint = prefix + f.name, getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            problems += _type_problems(value, name + ".")
        elif typing.get_origin(hint) is tuple:
            kinds = typing.get_args(hint)
            if not isinstance(value, (tuple, list)) or len(value) != len(kinds):
                problems.append(f"{name}={_show(value)} is not a list of {len(kinds)} numbers")
            else:
                problems += [f"{name}[{i}]={_show(v)} is not {_kind(k)}" for i, (v, k) in enumerate(zip(value, kinds))
                             if not _is(v, k)]
        elif not _is(value, hint):
            problems.append(f"{name}={_show(value)} is not {_kind(hint)}")
    return problems


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    return True


def _kind(kind) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}
    return names.get(kind, str(kind))


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------------- values

def _value_problems(cfg: ReconstructionConfig) -> list[str]:
    from .augment import AUGMENTATIONS
    from .guidance.fast_paths import MODES as PRIOR_COMPILE_MODES
    from .guidance.fast_paths import VAE_ATTENTION
    from .guidance.stable_diffusion import _DTYPES, WEIGHTINGS  # the names the prior understands

    problems: list[str] = []

    def need(ok: bool, setting: str, expected: str) -> None:
        if not ok:
            value = cfg
            for part in setting.split("."):
                value = getattr(value, part)
            problems.append(f"{setting}={_show(value)} must be {expected}")

    def one_of(setting: str, names) -> None:
        section, _, key = setting.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, key)
        need(value in names, setting, "one of " + ", ".join(names))

    def between(setting: str, low, high) -> None:
        section, _, key = setting.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, key)
        need(low <= value <= high, setting, f"from {low} to {high}")

    def ordered_range(setting: str, low, high) -> None:
        section, _, key = setting.rpartition(".")
        a, b = getattr(getattr(cfg, section), key)
        need(low <= a <= b <= high, setting, f"[low, high] with {low} <= low <= high <= {high}")

    between("seed", 0, SEED_MAX)
    one_of("method", known_methods())

    m = cfg.matting
    between("matting.image_size", 64, 2048)
    need(0 < m.object_fraction <= 1, "matting.object_fraction", "in (0, 1]")
    between("matting.alpha_threshold", 0, 1)
    between("matting.min_input_size", 1, 4096)
    between("matting.min_object_fraction", 0, 1)

    p = cfg.prior
    need(bool(p.model.strip()), "prior.model", "a Stable Diffusion hub id or folder")
    one_of("prior.dtype", ("auto", *_DTYPES))
    need(p.guidance_scale > 0, "prior.guidance_scale", "above 0")
    need(0 <= p.t_range[0] < p.t_range[1] <= 1, "prior.t_range", "[low, high] with 0 <= low < high <= 1")
    one_of("prior.weighting", tuple(WEIGHTINGS))
    between("prior.view_prompt_every", 1, 1_000_000)
    between("prior.front_angle_deg", 0, 360)
    between("prior.overhead_angle_deg", 0, 90)
    one_of("prior.compile", PRIOR_COMPILE_MODES)
    one_of("prior.vae_attention", VAE_ATTENTION)

    ti = cfg.textual_inversion
    need(bool(ti.placeholder) and not any(c.isspace() for c in ti.placeholder) and len(ti.placeholder) <= 32,
         "textual_inversion.placeholder", "one short string without spaces, such as <e>")
    need(re.fullmatch(INITIALIZER_PATTERN, ti.initializer) is not None, "textual_inversion.initializer",
         "one plain word naming the object (letters only, up to 32), such as object, mug or teddy")
    need(_has_one_slot(ti.prompt), "textual_inversion.prompt",
         'a sentence with one {} where the placeholder goes, such as "an image of a {}"')
    between("textual_inversion.steps", 1, 1_000_000)
    between("textual_inversion.batch_size", 1, 64)
    between("textual_inversion.grad_accumulation", 1, 64)
    need(0 < ti.learning_rate <= 1, "textual_inversion.learning_rate", "in (0, 1]")
    between("textual_inversion.weight_decay", 0, 1)
    one_of("textual_inversion.augmentations", tuple(AUGMENTATIONS))
    need(8 <= ti.resolution <= 2048 and ti.resolution % 8 == 0, "textual_inversion.resolution",
         "a multiple of 8 from 8 to 2048 (the VAE halves the side three times)")

    c = cfg.camera
    between("camera.ref_polar_deg", 0, 180)
    between("camera.ref_azimuth_deg", -360, 360)
    need(c.ref_radius > 0, "camera.ref_radius", "above 0")
    need(0 < c.ref_fovy_deg < 180, "camera.ref_fovy_deg", "between 0 and 180 degrees")
    need(0 < c.radius_range[0] <= c.radius_range[1], "camera.radius_range", "[low, high] with 0 < low <= high")
    need(0 < c.fovy_range_deg[0] <= c.fovy_range_deg[1] < 180, "camera.fovy_range_deg",
         "[low, high] with 0 < low <= high < 180")
    ordered_range("camera.polar_range_deg", 0, 180)
    ordered_range("camera.azimuth_range_deg", -360, 360)
    between("camera.uniform_sphere_rate", 0, 1)
    between("camera.uniform_sphere_max_polar_deg", 0, 180)

    f = cfg.field
    need(f.bound > 0, "field.bound", "above 0")
    between("field.n_levels", 1, 32)
    between("field.n_features_per_level", 1, 8)
    between("field.log2_hashmap_size", 4, 24)
    between("field.base_resolution", 2, 8192)
    need(f.base_resolution <= f.finest_resolution <= 65536, "field.finest_resolution",
         f"from field.base_resolution ({f.base_resolution}) to 65536")
    between("field.hidden_dim", 1, 1024)
    between("field.num_layers", 1, 16)
    need(f.blob_density >= 0, "field.blob_density", "0 or more")
    need(f.blob_radius > 0, "field.blob_radius", "above 0")
    one_of("field.backend", FIELD_BACKENDS)
    between("field.bg_hidden_dim", 1, 1024)

    r = cfg.render
    need(1e-4 <= r.step_size <= f.bound, "render.step_size",
         f"from 0.0001 to field.bound ({f.bound}) (world units; the official 0.006766, coarser for a CPU)")
    between("render.max_samples", 1, 65536)
    between("render.min_transmittance", 0, 1)
    between("render.occupancy_resolution", 4, 512)
    between("render.occupancy_update_every", 1, 1_000_000)
    between("render.occupancy_decay", 0, 1)
    need(r.occupancy_threshold >= 0, "render.occupancy_threshold", "0 or more")
    between("render.occupancy_dilation", 0, 16)
    need(r.occupancy_haze_ratio >= 0, "render.occupancy_haze_ratio", "0 or more (0: no floor)")
    need(r.light_jitter >= 0, "render.light_jitter", "0 or more")
    need(r.normal_epsilon > 0, "render.normal_epsilon", "above 0")
    need(r.normal_min_weight >= 0, "render.normal_min_weight", "0 or more")
    between("render.ref_resolution", 8, 2048)
    between("render.random_resolution", 8, 2048)
    between("render.albedo_only_fraction", 0, 1)
    need(all(v >= 0 for v in r.shading_probs) and sum(r.shading_probs) > 0, "render.shading_probs",
         "three weights of 0 or more (albedo, lambertian, textureless), not all 0")
    between("render.ambient_ratio", 0, 1)
    one_of("render.background", RENDER_BACKGROUNDS)

    one_of("loss.sds_schedule", ("gradscaler", "constant"))
    need(cfg.loss.sds_initial_scale > 0, "loss.sds_initial_scale", "above 0")
    need(0 < cfg.loss.sds_scale_growth_fraction <= 1, "loss.sds_scale_growth_fraction", "in (0, 1]")
    for name in ("sds", "image", "mask", "empty_space", "normal_smooth_2d", "entropy", "orientation"):
        need(getattr(cfg.loss, name) >= 0, f"loss.{name}", "0 or more")
    between("loss.empty_space_points", 1, 1 << 20)
    need(1 <= cfg.loss.normal_blur_kernel <= 99 and cfg.loss.normal_blur_kernel % 2 == 1,
         "loss.normal_blur_kernel", "an odd number from 1 to 99")

    fit = cfg.fit
    between("fit.iterations", 1, 10_000_000)
    need(0 < fit.learning_rate <= 1, "fit.learning_rate", "in (0, 1]")
    need(fit.grid_lr_multiplier > 0, "fit.grid_lr_multiplier", "above 0")
    need(all(0 <= b < 1 for b in fit.betas), "fit.betas", "two numbers from 0 to below 1, such as [0.9, 0.99]")
    need(fit.eps > 0, "fit.eps", "above 0")
    need(0 <= fit.ema_decay < 1, "fit.ema_decay", "from 0 to below 1")
    between("fit.coarse_to_fine_fraction", 0, 1)
    need(0 <= fit.coarse_levels_masked < f.n_levels, "fit.coarse_levels_masked",
         f"from 0 to below field.n_levels ({f.n_levels})")
    between("fit.ref_view_every", 1, 10_000_000)
    between("fit.preview_every", 1, 10_000_000)
    between("fit.checkpoint_every", 1, 10_000_000)
    between("fit.turntable_views", 1, 64)
    between("fit.turntable_resolution", 8, 2048)
    between("fit.ema_every", 1, 1_000_000)

    k = cfg.conrad
    need(k.image_loss >= 0, "conrad.image_loss", "0 or more")
    need(k.delta >= 0, "conrad.delta", "0 or more (world units)")
    need(0 < k.depth_threshold < 1, "conrad.depth_threshold", "between 0 and 1")
    between("conrad.depth_refresh_every", 1, 1_000_000)
    between("conrad.depth_resolution", 0, 4096)
    between("conrad.depth_samples", 2, 8192)
    one_of("conrad.outside_mask", ("background", "field"))
    between("conrad.outline_dilation_px", 0, 64)

    between("export.min_component_fraction", 0, 1)
    between("export.cavity_closing", 0, 0.1)
    return problems


def _has_one_slot(prompt: str) -> bool:
    """Exactly one "{}" and no other format field, so prompt.format(placeholder) works and uses it."""
    try:
        fields = [name for _text, name, _spec, _conv in string.Formatter().parse(prompt) if name is not None]
    except ValueError:  # a lone "{" or "}"
        return False
    return fields == [""] and len(prompt) <= 200


def _export_problems(cfg: ReconstructionConfig) -> list[str]:
    """The export's own check, now rather than after the whole fit."""
    from .export import check_config  # late: it imports the renderer and torch

    try:
        check_config(cfg.export)
    except EngineError as exc:
        return [exc.problem.rstrip(".").replace("Export setting ", "export.", 1) + f" ({exc.fix.rstrip('.')})"]
    return []
