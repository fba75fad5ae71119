"""Train the learned prior and write it as a diffusers folder; then measure its samples.

    python -m engine.prior_training.train --out FOLDER [--device cuda] [--size base|small|tiny]   (scripts/train_prior)

Seeded (torch generators everywhere, one seed), logged to FOLDER/train_log.txt and to stdout. Stages: ray cast
the shapes' geometry; train the VAE (L1 + MSE + a small KL, as SD's without the GAN); train UNet and text encoder
together on the frozen VAE's latents (DDPM epsilon loss, 10 % empty captions for classifier-free guidance, EMA);
save; load the folder back through `load_stable_diffusion` (the pipeline's own loader) and sample 16 images per
caption, judged by a CNN trained on the renders; write FOLDER/sanity.json and FOLDER/samples.png.

The text encoder is trained, not frozen: no pretrained CLIP exists here, and a frozen random one would hand the
UNet arbitrary features in which "green" and "cube" are not separate directions; trained jointly, each word's row
of the embedding table becomes the concept the UNet responds to, which is what textual inversion searches among
(its `<e>` starts at the initializer word's row).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import models
from .sampling import classify, judge_accuracy, sample_images, train_judge
from .world import COLORS, HELD_OUT, SHAPES, caption, render_geometry, sample_batch


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a")

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        self.handle.write(line + "\n")
        self.handle.flush()


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_vae(bank, steps: int, batch: int, generator, device, log, size: str):
    vae = models.vae(size).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in range(steps):
        images = sample_batch(bank, batch, generator, captioned=False, include_held_out=False).images
        x = images * 2 - 1
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator)).sample.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            psnr = -10 * math.log10(max(F.mse_loss((recon + 1) / 2, images).item(), 1e-10))
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.4f} recon PSNR {psnr:.2f} dB")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD's convention: latents scaled to unit variance for the UNet
        x = sample_batch(bank, 512, generator, captioned=False).images * 2 - 1
        std = float(torch.cat([vae.encode(c).latent_dist.sample(generator) for c in x.split(128)]).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae latent std {std:.4f} -> scaling_factor {1 / std:.4f}")
    return vae


def train_denoiser(bank, vae, tokenizer, steps: int, batch: int, generator, device, log, size: str,
                   max_seconds: float, lr: float = 4e-4):
    unet = models.unet(size).to(device).train()
    text_encoder = models.text_encoder(len(tokenizer), size).to(device).train()
    scheduler = models.scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 300))
    ema = [p.detach().clone() for p in params]
    started, losses, token_ids = time.perf_counter(), [], {}
    done = 0
    for step in range(steps):
        data = sample_batch(bank, batch, generator)
        for text in set(data.captions) - token_ids.keys():  # the captions are few: tokenize each once
            token_ids[text] = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                                        truncation=True, return_tensors="pt").input_ids[0]
        ids = torch.stack([token_ids[text] for text in data.captions]).to(device)
        with torch.no_grad():
            latents = vae.encode(data.images * 2 - 1).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast(device):
            context = text_encoder(ids)[0]
            eps = unet(noisy, t, encoder_hidden_states=context).sample.float()
        loss = F.mse_loss(eps, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        done = step + 1
        elapsed = time.perf_counter() - started
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            recent = losses[-200:]
            log(f"denoiser step {step} loss {sum(recent) / len(recent):.4f} ({elapsed:.0f} s)")
        if elapsed > max_seconds:
            log(f"denoiser stopped at step {done} of {steps}: the time budget of {max_seconds:.0f} s is spent")
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval(), text_encoder.eval(), scheduler, done, losses


def save_folder(out: Path, tokenizer_dir: Path, vae, unet, text_encoder, scheduler) -> None:
    unet.to(torch.float16).save_pretrained(str(out / "unet"))  # fp16 on disk keeps the folder small
    unet.float()
    vae.save_pretrained(str(out / "vae"))
    text_encoder.save_pretrained(str(out / "text_encoder"))
    scheduler.save_pretrained(str(out / "scheduler"))
    assert (tokenizer_dir / "vocab.json").is_file()
    (out / "model_index.json").write_text(json.dumps(models.model_index(), indent=2) + "\n")


def sanity(folder: Path, bank, judge, generator, device, per_caption: int, log, guidance: float = 4.0,
           steps: int = 50) -> dict:
    """Samples per caption, judged; the held-out combination is sampled too but not counted."""
    from engine.guidance import load_stable_diffusion
    from engine.outputs import image_grid, save_png

    sd = load_stable_diffusion(str(folder), device, "fp32")
    combos = [(c, s) for s in SHAPES for c in COLORS]
    prompts = [caption(color, shape, None) for color, shape in combos for _ in range(per_caption)]
    every = sample_images(sd, prompts, generator, steps=steps, guidance=guidance)
    results, rows = [], []
    for k, (color, shape) in enumerate(combos):
        images = every[k * per_caption:(k + 1) * per_caption]
        shapes, colors = classify(judge, images)
        hits = sum(s == shape and c == color for s, c in zip(shapes, colors))
        results.append({"caption": prompts[k * per_caption], "held_out": (color, shape) == HELD_OUT,
                        "samples": per_caption, "correct": hits, "shape_correct": sum(s == shape for s in shapes),
                        "color_correct": sum(c == color for c in colors)})
        rows.append(list(images[:8].permute(0, 2, 3, 1).cpu()))
    save_png(folder / "samples.png", image_grid(rows))
    trained = [r for r in results if not r["held_out"]]
    accuracy = sum(r["correct"] for r in trained) / sum(r["samples"] for r in trained)
    worst = min(r["correct"] / r["samples"] for r in trained)
    log(f"sanity: {accuracy:.3f} of {sum(r['samples'] for r in trained)} samples judged right "
        f"(worst caption {worst:.3f})")
    return {"accuracy": accuracy, "worst_caption_accuracy": worst, "sampler": f"DDIM {steps} steps",
            "guidance_scale": guidance, "per_caption": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(models.IMAGE_SIZE), default="base",
                        help="base: 64 px (GPU); small: 32 px (a CPU in half an hour); tiny: smoke tests")
    parser.add_argument("--views-per-shape", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--workers", type=int, default=1, help="processes for the ray casting")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--unet-steps", type=int, default=12000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-unet-seconds", type=float, default=300.0)
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--judge-batch", type=int, default=128)
    parser.add_argument("--measure-only", action="store_true",
                        help="only the sanity check of the folder already at --out (its judge.pt reused)")
    parser.add_argument("--samples-per-caption", type=int, default=16)
    args = parser.parse_args(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train_log.txt")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    import diffusers
    import transformers

    log(f"train_prior {' '.join(sys.argv[1:])}")
    timings = {}
    clock = time.perf_counter()
    # Ray cast in forked workers before CUDA is touched here (a fork after CUDA's start is unsafe).
    bank = render_geometry(args.views_per_shape, 2 * models.IMAGE_SIZE[args.size], args.seed, args.workers).to(device)
    timings["ray_cast_s"] = time.perf_counter() - clock
    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    log(json.dumps(env))
    generator = torch.Generator(device).manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log(f"ray cast {len(SHAPES)} shapes x {args.views_per_shape} views at {2 * models.IMAGE_SIZE[args.size]} px "
        f"in {timings['ray_cast_s']:.1f} s")

    if args.measure_only:
        from .sampling import Judge

        judge = Judge().to(device)
        judge.load_state_dict(torch.load(out / "judge.pt", map_location=device))
        report = json.loads((out / "sanity.json").read_text())
        report["sanity"] = sanity(out, bank, judge.eval(), generator, device, args.samples_per_caption, log)
        report["measured_again"] = "sanity only (--measure-only)"
        (out / "sanity.json").write_text(json.dumps(report, indent=2) + "\n")
        return 0
    clock = time.perf_counter()
    tokenizer = models.write_tokenizer(out / "tokenizer")
    vae = train_vae(bank, args.vae_steps, args.vae_batch, generator, device, log, args.size)
    timings["vae_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    unet, text_encoder, scheduler, unet_steps, losses = train_denoiser(
        bank, vae, tokenizer, args.unet_steps, args.batch, generator, device, log, args.size, args.max_unet_seconds,
        args.lr)
    timings["denoiser_s"] = time.perf_counter() - clock
    save_folder(out, out / "tokenizer", vae, unet, text_encoder, scheduler)
    log(f"saved the diffusers folder to {out}")

    clock = time.perf_counter()
    judge = train_judge(bank, generator, args.judge_steps, args.judge_batch, log)
    judge_check = judge_accuracy(judge, bank, generator, 1024)
    torch.save(judge.state_dict(), out / "judge.pt")
    log(f"judge on fresh lambertian renders: {judge_check}")
    timings["judge_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    check = sanity(out, bank, judge, generator, device, args.samples_per_caption, log)
    timings["sanity_s"] = time.perf_counter() - clock
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    report = {"format": "realfusion-learned-prior/1", "seed": args.seed, "size": args.size, "env": env,
              "held_out": " ".join(HELD_OUT), "args": {k: str(v) for k, v in vars(args).items()},
              "denoiser_steps": unet_steps, "final_denoiser_loss": sum(losses[-200:]) / max(1, len(losses[-200:])),
              "timings": timings, "judge": judge_check, "sanity": check, "folder_mb": size_mb,
              "parameters_m": {"unet": sum(p.numel() for p in unet.parameters()) / 1e6,
                               "vae": sum(p.numel() for p in vae.parameters()) / 1e6,
                               "text_encoder": sum(p.numel() for p in text_encoder.parameters()) / 1e6}}
    (out / "sanity.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done: accuracy {check['accuracy']:.3f}, folder {size_mb:.1f} MB, timings {timings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
