"""A reduced reconstruction of the held-out object: the real prior path (matting, textual inversion, SDS with
classifier-free guidance through `stable_diffusion_prior`) into a small field for a few steps, scored against the
ground truth from views the photo does not show. CPU-sized: what the CI test compares priors with."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cameras import orbit_cameras
from ..config import ReconstructionConfig, apply_overrides, preset
from ..harness.raycast import ColoredMesh, render_ground_truth
from ..matting import prepare_reference
from ..outputs import OutputDir
from ..pipeline import stable_diffusion_prior
from ..system import RealFusionSystem, ReferenceView
from .heldout import held_out_mesh, write_photo

SMALL = ["matting.image_size=64", "render.ref_resolution=32", "render.random_resolution=32", "render.step_size=0.1",
         "render.occupancy_resolution=32", "field.n_levels=8", "field.log2_hashmap_size=14",
         "field.finest_resolution=128", "fit.coarse_levels_masked=4", "textual_inversion.batch_size=4",
         "textual_inversion.grad_accumulation=1", "render.albedo_only_fraction=1.0"]


# The CI comparison of priors (tests/test_learned_prior.py): 120 steps, a constant SDS weight of 0.1 at guidance 100,
# 20 steps of textual inversion at the model's 32 px. Measured on a 2-core CPU (about 32 s a run), seeds 0-4: the
# committed model's novel-view mask IoU is above the random tiny model's at every seed, by 0.064 to 0.147 (0.52-0.56
# against 0.38-0.45); novel PSNR is not (equal at seed 1). SDS dominates at this weight (reference PSNR about 9.5 dB
# for both), and without SDS the IoU is about 0.56: the learned prior spoils the shape less than the random one, it
# does not improve on no prior. At weight 1e-3 (120 or 200 steps) the random model is closer (seeds 0-2).
PRIOR_COMPARISON = ["fit.iterations=120", "loss.sds=0.1", "loss.sds_schedule=constant", "prior.guidance_scale=100",
                    "textual_inversion.steps=20", "textual_inversion.resolution=32"]


@dataclass
class ReducedScores:
    novel_psnr: float  # albedo over white, mean over the views behind and beside the photo's
    novel_mask_iou: float
    reference_psnr: float
    ti_losses: list[float]


def small_config(model: str, overrides: list[str] = ()) -> ReconstructionConfig:
    from engine.guidance import load_stable_diffusion  # noqa: F401  (fails early without diffusers)

    cfg = apply_overrides(preset("fast"), SMALL + list(overrides))
    cfg.prior.model = model
    cfg.textual_inversion.initializer = "cube"
    return cfg


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean().clamp(min=1e-10)))


def reduced_reconstruction(model: str, cfg: ReconstructionConfig, workdir: Path | None = None,
                           device: str = "cpu") -> ReducedScores:
    """Photo -> matting -> TI -> `fit.iterations` steps of the loop; novel views scored against the truth."""
    dev = torch.device(device)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="reduced_"))
    torch.manual_seed(cfg.seed)
    photo = write_photo(workdir / "photo", cfg)
    reference = prepare_reference(photo, cfg.matting)
    out = OutputDir(workdir / "run")
    guidance = stable_diffusion_prior(model, cache_dir=workdir / "cache")(cfg, reference, dev, out, lambda _p: None)
    from ..guidance import LearnedEmbedding

    ti_losses = LearnedEmbedding.load(out.file("embedding.pt")).losses if cfg.textual_inversion.enabled else []
    view = ReferenceView.from_arrays(reference.rgb, reference.mask, cfg.render.ref_resolution, dev)
    system = RealFusionSystem(cfg, view, guidance, dev, seed=cfg.seed)
    while system.step < cfg.fit.iterations:
        system.training_step()
    cam = cfg.camera
    size = cfg.render.ref_resolution
    # Views the photo does not show: beside and behind, a little higher, at a distance that frames the object.
    novel = orbit_cameras(cam.ref_polar_deg - 10, [cam.ref_azimuth_deg + a for a in (90, 180, 270)],
                          cam.ref_radius * 1.3, cam.ref_fovy_deg, size, dev)
    truth = render_ground_truth(ColoredMesh.from_trimesh(held_out_mesh(cfg)), novel, supersample=2)
    ours = system.render(novel, use_ema=False)
    inter = torch.minimum(ours.opacity, truth.mask.to(dev)).sum()
    union = torch.maximum(ours.opacity, truth.mask.to(dev)).sum()
    ref = system.render(system.ref_camera, use_ema=False)
    return ReducedScores(novel_psnr=_psnr(ours.rgb, truth.rgb.to(dev)), novel_mask_iou=float(inter / union),
                         reference_psnr=_psnr(ref.rgb[0], view.rgb), ti_losses=list(ti_losses))


