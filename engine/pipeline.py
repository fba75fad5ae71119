"""One reconstruction, stage by stage: matting -> prior (+ textual inversion) -> field fit -> pictures.

The pipeline reports progress through one callback that receives plain `Progress`
records, so the CLI (tqdm), the server (events) and tests can all listen without
the pipeline knowing who is there. Everything it produces goes into an `OutputDir`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .cameras import VIEWS, orbit_cameras, turntable_cameras
from .config import ReconstructionConfig
from .device import resolve_device  # noqa: F401  (re-exported: callers import it from here too)
from .field_file import FIELD_FILE, field_payload
from .matting import ReferenceImage, prepare_reference, save_reference
from .outputs import FIELD_REFERENCE_FILE, OutputDir, atomic_torch_save, atomic_write_bytes, image_grid, save_png
from .progress import Progress, ProgressCallback  # noqa: F401  (re-exported)
from .system import RealFusionSystem, ReferenceView

CHECKPOINT = "checkpoints/last.pt"
EMBEDDING_FILE = "embedding.pt"


def default_cache_dir() -> Path:
    root = os.environ.get("REALFUSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "realfusion")
    return Path(root)


def _load_stable_diffusion(model: str, device, dtype: str):
    from .guidance import load_stable_diffusion  # imported late: commands without a prior stay light

    return load_stable_diffusion(model, device, dtype)


class ModelCache:
    """Loaded Stable Diffusion models kept between reconstructions (the server's worker), keyed by
    (model id, device, dtype). Holds one model at a time: asking for another frees the previous one.

    Reusing a model is safe: the placeholder token's row is reset by `add_placeholder_token` and the
    learned vector is applied through a hook, so one job leaves nothing behind for the next.
    """

    def __init__(self, loader: Callable | None = None):
        import threading

        self._loader = loader
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._model = None
        self.loads = 0  # how many times a model was actually loaded (not taken from the cache)

    def get(self, model: str, device: torch.device, dtype: str):
        key = (str(model), str(device), str(dtype))
        with self._lock:
            if self._key != key:
                self._key, self._model = None, None  # free the old one before loading the new one
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._model = (self._loader or _load_stable_diffusion)(model, device, dtype)
                self._key = key
                self.loads += 1
            return self._model

    def clear(self) -> None:
        with self._lock:
            self._key, self._model = None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def loaded(self) -> str | None:
        """The model id held now, or None."""
        return self._key[0] if self._key else None


def stable_diffusion_prior(model: str | None = None, cache_dir: Path | None = None,
                           models: ModelCache | None = None, check_cancel: Callable[[], None] | None = None):
    """The paper's prior: Stable Diffusion guided by a prompt with a token learned from the image.

    With `models`, the model is taken from (and kept in) that cache instead of loaded for this run;
    `check_cancel()` raises to stop textual inversion between its micro-batches.
    """

    def make(cfg: ReconstructionConfig, reference: ReferenceImage, device: torch.device, out: OutputDir,
             report: ProgressCallback):
        from .guidance import (StableDiffusionGuidance, add_placeholder_token, cached_or_train,
                               load_stable_diffusion, text_embeddings_for_guidance)

        report(Progress("prior"))
        if models is not None:
            sd = models.get(model or cfg.prior.model, device, cfg.prior.dtype)
        else:
            sd = load_stable_diffusion(model or cfg.prior.model, device, cfg.prior.dtype)
        ti = cfg.textual_inversion
        token_id = add_placeholder_token(sd, ti.placeholder, ti.initializer)
        learned = None
        if ti.enabled:
            image = torch.as_tensor(reference.rgb).permute(2, 0, 1).float()
            generator = torch.Generator().manual_seed(cfg.seed)
            learned, _from_cache = cached_or_train(
                sd, image, reference.content_hash, ti, cache_dir or default_cache_dir() / "embeddings", generator,
                progress=lambda step, loss: report(Progress("textual_inversion", step + 1, ti.steps, {"loss": loss})),
                check_cancel=check_cancel,
                execution=cfg.prior,
            )
            learned.save(out.file(EMBEDDING_FILE))
        prompt = ti.prompt.format(ti.placeholder if ti.enabled else ti.initializer)
        vector = None if learned is None else learned.vector.to(device)
        embeddings = {"default": text_embeddings_for_guidance(sd, prompt, vector, token_id)}
        if cfg.prior.view_prompts:  # computed once: DreamFusion's direction suffixes
            embeddings.update({view: text_embeddings_for_guidance(sd, f"{prompt}, {view} view", vector, token_id)
                               for view in VIEWS})
        return StableDiffusionGuidance(sd, embeddings, cfg.prior)

    return make


def reconstruct(image_path: Path, outdir: Path, cfg: ReconstructionConfig, *, device: str | None = None,
                prior=None, report: ProgressCallback | None = None, resume: bool = True,
                check_cancel: Callable[[], None] | None = None) -> OutputDir:
    """Run every stage; on any error the status says `failed` with the message, and the error propagates.
    `check_cancel()` (the server's) raises to stop the job; the fit calls it before every step."""
    report = report or (lambda _p: None)
    out = OutputDir(outdir)
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    out.set_status("running", "matting")
    try:
        atomic_write_bytes(out.file("config.json"), cfg.to_json().encode())
        report(Progress("matting"))
        reference = prepare_reference(image_path, cfg.matting)
        save_reference(reference, out.path)

        out.set_status("running", "prior")
        guidance = (prior or stable_diffusion_prior())(cfg, reference, dev, out, report)

        out.set_status("running", "fit")
        system = RealFusionSystem(cfg, ReferenceView.from_arrays(reference.rgb, reference.mask,
                                                                 cfg.render.ref_resolution, dev),
                                  guidance, dev, seed=cfg.seed)
        if resume:
            _resume_if_possible(system, out)
        fit(system, out, report, check_cancel)

        out.set_status("running", "turntable")
        report(Progress("turntable"))
        save_turntable(system, out.file("turntable.png"))
        save_field_reference(system, out.file(FIELD_REFERENCE_FILE))
        save_field(system, out.file(FIELD_FILE))
        mesh = {}
        if cfg.export.enabled:
            from .export import export

            out.set_status("running", "export")
            mesh = {"mesh": export(out.path, cfg.export, device=dev, report=report).mesh_path.name}
    except BaseException as exc:
        out.set_status("failed", message=str(exc) or type(exc).__name__)
        raise
    out.set_status("done", "done", steps=system.step, **mesh)
    report(Progress("done", system.step, system.step))
    return out


def fit(system: RealFusionSystem, out: OutputDir, report: ProgressCallback,
        check_cancel: Callable[[], None] | None = None) -> None:
    fit_cfg = system.cfg.fit
    while system.step < fit_cfg.iterations:
        if check_cancel is not None:
            check_cancel()
        metrics = system.training_step()
        step = system.step
        preview = None
        if step % fit_cfg.preview_every == 0 or step == fit_cfg.iterations:
            preview = save_preview(system, out, step)
        if step % fit_cfg.checkpoint_every == 0 and step < fit_cfg.iterations:
            atomic_torch_save(out.file(CHECKPOINT), system.state_dict())
        report(Progress("fit", step, fit_cfg.iterations, metrics, preview))


def _resume_if_possible(system: RealFusionSystem, out: OutputDir) -> None:
    path = out.file(CHECKPOINT)
    if not path.exists():
        return
    state = torch.load(path, map_location=system.device, weights_only=False)
    if state.get("config") == system.cfg.to_dict():
        system.load_state_dict(state)


def save_preview(system: RealFusionSystem, out: OutputDir, step: int) -> Path:
    """Reference view and three turns around the object, color over normals, as previews/step_N.png and preview.png."""
    cam_cfg = system.cfg.camera
    size = system.cfg.render.random_resolution
    azimuths = [cam_cfg.ref_azimuth_deg + a for a in (0, 90, 180, 270)]
    cameras = orbit_cameras(cam_cfg.ref_polar_deg, azimuths, cam_cfg.ref_radius, cam_cfg.ref_fovy_deg, size,
                            system.device)
    picture = _color_and_normal_rows(system, cameras)
    path = out.file(f"previews/step_{step:06d}.png")
    save_png(path, picture)
    save_png(out.file("preview.png"), picture)
    return path


def save_turntable(system: RealFusionSystem, path: Path) -> None:
    fit_cfg = system.cfg.fit
    cameras = turntable_cameras(system.cfg.camera, fit_cfg.turntable_views, fit_cfg.turntable_resolution,
                                system.device)
    save_png(path, _color_and_normal_rows(system, cameras))


def _color_and_normal_rows(system: RealFusionSystem, cameras):
    out = system.render(cameras, shading="albedo")
    normals = out.normal * 0.5 + 0.5 * out.opacity[..., None]  # [-1,1] -> [0,1] inside, black outside
    return image_grid([list(out.rgb), list(normals)])


def save_field_reference(system: RealFusionSystem, path: Path) -> None:
    """The averaged field from the reference camera at the fit's reference size, as an RGBA PNG (its own
    colors and opacity): what `realfusion eval` scores the field itself by, beside the mesh."""
    view = system.render(system.ref_camera, shading="albedo")
    alpha = view.opacity[0, ..., None]
    color = torch.where(alpha > 1e-3, (view.rgb[0] - (1.0 - alpha)) / alpha.clamp(min=1e-3), torch.ones_like(view.rgb[0]))
    save_png(path, torch.cat([color.clamp(0, 1), alpha], -1))


def save_field(system: RealFusionSystem, path: Path) -> None:
    """The averaged field, its background, the config it was made with and its method's part: what export needs."""
    atomic_torch_save(path, field_payload(system))
