"""Issue 16's measurements with the learned prior (engine/prior_training), on the held-out green cube.

    python bench/learned_prior.py photo --out DIR             # DIR/input.png + DIR/ground_truth/
    python bench/learned_prior.py sphere --like RUN --out DIR # the plain-sphere baseline, scored like a run
    python bench/learned_prior.py ti --model FOLDER --run RUN --out JSON   # textual inversion's token, measured
    python bench/learned_prior.py table --dir DIR --out JSON  # the eval.json of each run, side by side

The reconstructions themselves are plain `realfusion reconstruct DIR/input.png -o DIR/NAME --preset fast
--model FOLDER --initializer cube --set textual_inversion.resolution=64` (32 for the tiny random model) and
`realfusion eval DIR/NAME --ground-truth DIR/ground_truth`; bench/learned_prior.sh runs the whole thing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import preset  # noqa: E402


def cmd_photo(args) -> None:
    from engine.prior_training.heldout import write_photo

    print(write_photo(args.out, preset("fast")))


def cmd_sphere(args) -> None:
    """A sphere at the true object's center, as wide as its largest extent, in the photo's mean color, written
    where a run's mesh.glb would be (same camera.json and reference.png), so `realfusion eval` scores it alike."""
    import trimesh

    from engine.export import CAMERA_FILE, REPORT_FILE
    from engine.export.gltf import Z_UP_TO_Y_UP
    from engine.export.placement import Placement
    from engine.harness.evaluate import load_ground_truth, over_white
    from engine.matting import MASK_NAME, REFERENCE_NAME

    run, out = Path(args.like), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CAMERA_FILE, REFERENCE_NAME, MASK_NAME):
        shutil.copy(run / name, out / name)
    _, points, _ = load_ground_truth(Path(args.ground_truth))
    low, high = points.min(0), points.max(0)
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5 * float((high - low).max()))
    sphere.apply_translation(0.5 * (low + high))
    rgb, alpha = over_white(run / REFERENCE_NAME)
    color = (rgb[alpha > 0.5].mean(0) * 255).round().astype(np.uint8)
    camera = json.loads((run / CAMERA_FILE).read_text())
    placement = Placement(float(camera["object"]["scale"]), np.asarray(camera["object"]["translation"], float))
    vertices = placement.apply(np.asarray(sphere.vertices)) @ np.linalg.inv(Z_UP_TO_Y_UP)
    mesh = trimesh.Trimesh(vertices, sphere.faces, vertex_colors=np.tile(np.r_[color, 255], (len(vertices), 1)),
                           process=False)
    (out / "mesh.glb").write_bytes(mesh.export(file_type="glb"))
    (out / REPORT_FILE).write_text(json.dumps({"mesh": "mesh.glb", "baseline": "plain sphere"}))
    print(out / "mesh.glb")


def _reference_image(run: Path) -> torch.Tensor:
    from engine.harness.evaluate import over_white
    from engine.matting import REFERENCE_NAME

    rgb, _ = over_white(run / REFERENCE_NAME)
    return torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)


def cmd_ti(args) -> None:
    """The run's learned <e> (RUN/embedding.pt, trained by `reconstruct`) against its initializer word: the
    denoising loss on the same fixed augmented batches, and samples judged / compared with renders of the object."""
    from engine.augment import augmentation_config
    from engine.guidance import LearnedEmbedding, add_placeholder_token, load_stable_diffusion
    from engine.guidance.textual_inversion import denoising_loss, training_batch
    from engine.prior_training.sampling import Judge, classify, sample_images
    from engine.prior_training.world import COLORS, HELD_OUT, caption, compose, render_geometry

    device = torch.device(args.device)
    run = Path(args.run)
    if args.train_steps:
        _train_run(args, run)
    cfg = json.loads((run / "config.json").read_text())["textual_inversion"]
    # the object from many views at twice the model's size (forked ray casting: before CUDA starts here)
    native = json.loads((Path(args.model) / "unet" / "config.json").read_text())["sample_size"] * 4
    bank = render_geometry(args.renders, 2 * native, 7, workers=args.workers, shapes=(HELD_OUT[1],)).to(device)
    sd = load_stable_diffusion(args.model, device, "fp32")
    learned = LearnedEmbedding.load(run / "embedding.pt")
    token_id = add_placeholder_token(sd, learned.placeholder, learned.initializer)
    initial = sd.text_encoder.get_input_embeddings().weight[token_id].detach().clone()
    vector = learned.vector.to(device)
    prompt = cfg["prompt"].format(learned.placeholder)
    image = _reference_image(run).to(device)
    augment = augmentation_config(cfg["augmentations"])
    fixed = {"initializer": [], "learned": []}
    with torch.no_grad():
        for k in range(args.loss_batches):
            generator = torch.Generator().manual_seed(1000 + k)  # on the CPU, as the pipeline's
            latents, t, noise = training_batch(sd, image, cfg["resolution"], 8, generator, augmentations=augment)
            for name, row in (("initializer", initial), ("learned", vector)):
                fixed[name].append(float(denoising_loss(sd, latents, t, noise, row, token_id, prompt)))
    losses = learned.losses
    window = max(1, min(50, len(losses) // 5))

    # Samples: <e>, the initializer word, and the held-out caption itself (never trained on), judged.
    judge = Judge().to(device)
    judge.load_state_dict(torch.load(Path(args.model) / "judge.pt", map_location=device))
    judge.eval()
    generator = torch.Generator(device).manual_seed(0)
    count = args.samples
    prompts = {"<e>": prompt, "initializer": cfg["prompt"].format(learned.initializer),
               "held-out caption": caption(*HELD_OUT, None)}
    views = torch.arange(args.renders, device=device)
    color = torch.full((args.renders,), list(COLORS).index(HELD_OUT[0]), device=device)
    shading = ["albedo" if i % 2 else "lambertian" for i in range(args.renders)]
    renders = compose(bank, torch.zeros_like(views), views, color, shading, generator)  # the object, many views
    samples = {}
    from engine.outputs import image_grid, save_png

    rows = []
    for name, text in prompts.items():
        use = name == "<e>"
        images = sample_images(sd, [text] * count, generator, vector=vector if use else None,
                               token_id=token_id if use else None)
        shapes, colors = classify(judge, images)
        distance = torch.cdist(images.flatten(1), renders.flatten(1)).min(1).values / images[0].numel() ** 0.5
        samples[name] = {"prompt": text, "samples": count,
                         "judged_held_out_object": sum(s == HELD_OUT[1] and c == HELD_OUT[0]
                                                       for s, c in zip(shapes, colors)) / count,
                         "judged_shape": sum(s == HELD_OUT[1] for s in shapes) / count,
                         "judged_color": sum(c == HELD_OUT[0] for c in colors) / count,
                         "nearest_render_rms": float(distance.mean()),
                         "shapes": shapes, "colors": colors}
        rows.append(list(images[:8].permute(0, 2, 3, 1).cpu()))
    save_png(Path(args.out).with_suffix(".png"), image_grid(rows))
    result = {"format": "realfusion-learned-prior-ti/1", "model": args.model, "run": str(run),
              "object": " ".join(HELD_OUT), "initializer": learned.initializer, "steps": learned.steps,
              "recipe": cfg,
              "training_loss": {"first_steps_mean": float(np.mean(losses[:window])),
                                "last_steps_mean": float(np.mean(losses[-window:])), "window": window},
              "fixed_batch_loss": {"batches": args.loss_batches, "batch_size": 8,
                                   "initializer": float(np.mean(fixed["initializer"])),
                                   "learned": float(np.mean(fixed["learned"])),
                                   "learned_lower_in": sum(b < a for a, b in zip(fixed["initializer"], fixed["learned"]))},
              "vector_change": float((vector - initial).norm() / initial.norm()),
              "samples": samples,
              "nearest_render": f"RMS pixel distance of each 64 px sample to the nearest of {args.renders} renders "
                                "of the object (random views, albedo/lambertian, white or colored backgrounds)",
              "sampler": "DDIM 50 steps, guidance 4"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("training_loss", "fixed_batch_loss")}),
          {k: (v["judged_held_out_object"], v["nearest_render_rms"]) for k, v in samples.items()})


def _train_run(args, run: Path) -> None:
    """Textual inversion alone, as `reconstruct --preset fast` runs it (matting, then `cached_or_train`'s
    training), into RUN: config.json, reference.png, embedding.pt."""
    from engine.guidance import load_stable_diffusion, train_embedding
    from engine.matting import prepare_reference, save_reference
    from engine.prior_training.heldout import write_photo

    cfg = preset("fast")
    sd = load_stable_diffusion(args.model, args.device, "fp32")
    ti = cfg.textual_inversion
    ti.steps, ti.initializer, ti.resolution = args.train_steps, "cube", sd.resolution
    reference = prepare_reference(write_photo(run / "photo", cfg), cfg.matting)
    save_reference(reference, run)
    image = torch.as_tensor(reference.rgb).permute(2, 0, 1).float()
    learned = train_embedding(sd, image, ti, torch.Generator().manual_seed(cfg.seed))
    learned.save(run / "embedding.pt")
    (run / "config.json").write_text(cfg.to_json())


def cmd_table(args) -> None:
    rows = {}
    for run in sorted(Path(args.dir).iterdir()):
        path = run / "eval.json"
        if not path.is_file():
            continue
        e = json.loads(path.read_text())
        status = json.loads((run / "status.json").read_text()) if (run / "status.json").is_file() else {}
        rows[run.name] = {"fscore@0.05": e["geometry"]["fscore"], "chamfer": e["geometry"]["chamfer"],
                          "fscore@0.02": e["geometry"].get("fscore_at", {}).get("0.02", e["geometry"].get("fscore_0.02")),
                          "reference_psnr": e["reference_view"]["psnr"],
                          "reference_mask_iou": e["reference_view"]["mask_iou"],
                          "field_reference": e["reference_view"].get("field"),
                          "novel_psnr": e["novel_views"]["psnr"], "novel_ssim": e["novel_views"]["ssim"],
                          "geometry": e["geometry"], "steps": status.get("steps")}
    extra = json.loads(Path(args.extra).read_text()) if args.extra else {}
    Path(args.out).write_text(json.dumps({"format": "realfusion-learned-prior-reconstruction/1", **extra,
                                          "runs": rows}, indent=2) + "\n")
    print(json.dumps({k: {m: v[m] for m in ("fscore@0.05", "fscore@0.02", "reference_psnr", "reference_mask_iou",
                                            "novel_psnr")} for k, v in rows.items()}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("photo")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("sphere")
    p.add_argument("--like", type=Path, required=True)
    p.add_argument("--ground-truth", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("ti")
    p.add_argument("--model", required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--renders", type=int, default=400)
    p.add_argument("--loss-batches", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=0,
                   help="train the embedding here first (fast preset's recipe, this many steps) instead of a run's")
    p = sub.add_parser("table")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--extra", type=Path)
    args = parser.parse_args()
    {"photo": cmd_photo, "sphere": cmd_sphere, "ti": cmd_ti, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
