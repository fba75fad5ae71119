"""How hard SDS pulls against the reference losses, with full-size Stable Diffusion (random weights, GPU).

    python bench/gradient_balance.py [--steps 300] [--every 25] [--backend auto] [--schedules gradscaler constant]
                                     [--seconds S]

The official runs used fp16 with a GradScaler and applied SDS outside the scaled loss, so SDS was
effectively weighted 1/S (S = 2^16, doubling every 2000 steps): `loss.sds_schedule=gradscaler`.
This fits the `paper` preset to the harness figure's photo twice from the same start, once with
that schedule and once with SDS at weight 1 (`constant`, what the project did before), and logs
every `--every` steps each term's gradient norm on the field's parameters (weighted as the loss
weights them) and the field's reference-view PSNR and mask IoU. A random-weight prior is pure
noise, so whatever it does to the reference view is the prior overpowering the photo.
Writes bench/results/gradient_balance_<gpu>[_<schedule>].json after every logged step, so a run stopped by
its `--seconds` budget (or killed) keeps what it measured; one process per schedule runs them side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_steps import build_full_size  # noqa: E402
from engine.cameras import VIEWS, reference_camera  # noqa: E402
from engine.config import apply_overrides, preset  # noqa: E402
from engine.guidance import (StableDiffusionGuidance, add_placeholder_token, load_stable_diffusion,  # noqa: E402
                             text_embeddings_for_guidance)
from engine.harness.objects import make_object  # noqa: E402
from engine.harness.raycast import ColoredMesh, render_ground_truth  # noqa: E402
from engine.system import RealFusionSystem, ReferenceView  # noqa: E402


def term_gradient_norms(system: RealFusionSystem) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each weighted term's gradient norm over the field's parameters at this step (no update made)."""
    terms = system.loss_terms()
    weights = system.loss_weights(system.step)
    params = [p for p in system.field.parameters() if p.requires_grad]
    norms = {}
    for name, value in terms.items():
        grads = torch.autograd.grad(weights[name] * value, params, retain_graph=True, allow_unused=True)
        norms[name] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return norms, terms


def reference_scores(system: RealFusionSystem, photo) -> dict:
    view = system.render(system.ref_camera, use_ema=False)
    mse = float(((view.rgb[0] - system.reference.rgb) ** 2).mean())
    inter = float(torch.minimum(view.opacity[0], system.reference.mask).sum())
    union = float(torch.maximum(view.opacity[0], system.reference.mask).sum())
    return {"psnr": -10 * torch.log10(torch.tensor(mse)).item(), "mask_iou": inter / max(union, 1e-9)}


def run(sd, schedule: str, steps: int, every: int, backend: str, seconds: float = float("inf"),
        save=lambda _partial: None) -> dict:
    cfg = apply_overrides(preset("paper"), [f"loss.sds_schedule={schedule}", f"field.backend={backend}"])
    device = sd.device
    token_id = add_placeholder_token(sd, "<e>", "object")
    prompt = "an image of a <e>"
    embeddings = {"default": text_embeddings_for_guidance(sd, prompt, None, token_id)}
    embeddings.update({v: text_embeddings_for_guidance(sd, f"{prompt}, {v} view", None, token_id) for v in VIEWS})
    guidance = StableDiffusionGuidance(sd, embeddings, cfg.prior)
    mesh = ColoredMesh.from_trimesh(make_object("figure", cfg.camera))
    photo = render_ground_truth(mesh, reference_camera(cfg.camera, cfg.render.ref_resolution), supersample=2)
    reference = ReferenceView(photo.rgb[0].to(device), photo.mask[0].to(device))
    torch.manual_seed(0)
    system = RealFusionSystem(cfg, reference, guidance, device, seed=0)
    log = []
    started = time.perf_counter()
    for step in range(steps):
        out_of_time = time.perf_counter() - started > seconds
        if step % every == 0 or step == steps - 1 or out_of_time:
            norms, _ = term_gradient_norms(system)
            reference_terms = (norms.get("image", 0.0) ** 2 + norms.get("mask", 0.0) ** 2) ** 0.5
            log.append({"step": step, "sds_weight": system.loss_weights(step)["sds"], "grad_norm": norms,
                        "sds_over_reference": norms.get("sds", 0.0) / max(reference_terms, 1e-12),
                        "reference_view": reference_scores(system, photo)})
            print(schedule, log[-1], flush=True)
            save({"schedule": schedule, "steps": step, "partial": True, "log": log})
        if out_of_time:
            steps = step
            break
        system.training_step()
    return {"schedule": schedule, "steps": steps, "seconds": round(time.perf_counter() - started, 1),
            "skipped_steps": system.skipped_steps, "log": log, "final_reference_view": reference_scores(system, photo)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--schedules", nargs="+", default=["gradscaler", "constant"],
                        choices=["gradscaler", "constant"])
    parser.add_argument("--seconds", type=float, default=float("inf"), help="stop each run after this long")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        sd = load_stable_diffusion(str(build_full_size(Path(tmp), args.arch)), device, "auto")
    gpu = torch.cuda.get_device_name().lower().replace(" ", "-") if device.type == "cuda" else "cpu"
    suffix = "" if len(args.schedules) == 2 else f"_{args.schedules[0]}"
    path = args.out / f"gradient_balance_{gpu}{suffix}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": gpu, "torch": torch.__version__, "python": platform.python_version(), "arch": args.arch,
              "weights": "random (full-size architecture)", "preset": "paper", "backend": args.backend, "runs": []}

    def save(partial: dict) -> None:
        path.write_text(json.dumps({**result, "runs": result["runs"] + [partial]}, indent=2))

    for schedule in args.schedules:
        result["runs"].append(run(sd, schedule, args.steps, args.every, args.backend, args.seconds, save))
        path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
