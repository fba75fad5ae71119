"""Time to mesh: a whole `reconstruct`, photo to textured GLB, at each preset, cost-faithful (GPU).

    python bench/time_to_mesh.py [--presets fast standard paper] [--backend auto|torch|triton|tcnn]
                                 [--compile MODE (default: the preset's)] [--object figure]
                                 [--max-seconds 3600] [--reference-steps 10] [--set section.key=value ...]
                                 [--tiny]

What runs is `engine.pipeline.reconstruct` exactly as the CLI runs it (matting, model load,
textual inversion, field fit with previews and checkpoints, turntable, GLB export), on a photo
of a harness object (engine/harness/objects.py), with one change: the prior.

* Full-size SD 1.5 with random weights (bench_steps.build_full_size, loaded through
  `load_stable_diffusion`) runs at full cost: textual inversion trains at the preset's recipe
  (cache off), and every fit step runs the real SDS computation (`StableDiffusionGuidance`:
  upsample to 512, VAE encode, UNet with CFG, backward through the VAE into the render).
* Random weights would steer the geometry nowhere (the field ends empty and export stops), so
  the update comes from the harness's oracle prior instead (`OracleGuidance`, the true object's
  SDS in image space). `CostFaithfulGuidance` runs the SD part on a detached copy of the render
  and back-propagates its gradient into that copy (all of the SDS cost, the gradient is computed
  and its norm accumulated on the device, so nothing can be skipped), then returns the oracle's
  loss, whose backward goes through the render into the field once, as SDS's would. The oracle's
  own cost (ray casting the true mesh) is not part of a real run: it is timed and reported
  (`oracle_s`) and subtracted in `total_minus_oracle_s`.

Per-step breakdown, timed with CUDA events on the stream (synchronized once a step, when the
step reads its loss anyway): textual inversion (whole optimizer step), and for the fit step
render (both views' forward), SDS (the SD part), oracle, optimizer (Adam + EMA), and
backward_and_losses (the step minus those: loss terms and the backward). The instrumentation
wraps the system's renderer, optimizer and EMA objects from outside (RealFusionSystem is not
changed). Before the run, the same process times reference steps written the plain way
(eager, NCHW weights, the official 1 x 4 accumulation, the PyTorch hash grid).

Writes bench/results/time_to_mesh_<device>_<preset>.json (and into $OUT): device, versions,
preset, backend, per-stage seconds, per-step breakdown, reference step times, peak GPU memory
(whole run and per stage) and the harness's scores of the exported mesh (engine/harness/evaluate.py).
`--max-seconds` stops a run that would take longer (the JSON then says completed: false and
gives the medians measured so far). `--tiny` is the CPU smoke test: the tests' tiny SD and a few
steps at tiny sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_steps import model_folder  # noqa: E402
from check_fastpaths import device_name, save_result, versions  # noqa: E402  (one report header for both benches)

from engine.config import build_config, preset  # noqa: E402
from engine.fields.hashgrid import auto_backend  # noqa: E402
from engine.guidance import load_stable_diffusion  # noqa: E402
from engine.guidance.fast_paths import MODES, prior_modules  # noqa: E402
from engine.harness.oracle import OracleGuidance, oracle_gain  # noqa: E402
from engine.system import RealFusionSystem  # noqa: E402

# CPU smoke test: small enough to finish in seconds, big enough that every stage runs.
TINY_OVERRIDES = [
    "matting.image_size=64", "textual_inversion.steps=3", "textual_inversion.resolution=32", "fit.iterations=6", "fit.preview_every=3",
    "fit.checkpoint_every=3", "fit.turntable_views=2", "fit.turntable_resolution=16",
    "field.n_levels=4", "field.log2_hashmap_size=10", "field.finest_resolution=32", "fit.coarse_levels_masked=1",
    "render.step_size=0.1", "render.occupancy_resolution=16", "render.random_resolution=16", "render.ref_resolution=16",
    "export.resolution=32", "export.texture_size=64", "export.max_faces=2000",
]


class BudgetExceeded(Exception):
    """The run passed --max-seconds."""


# ----------------------------------------------------------------------------- timing


class Sections:
    """Named device-time sections of one step: CUDA events on the current stream (perf_counter on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []
        self.steps: list[dict[str, float]] = []
        self.in_step = False  # renders outside a training step (previews, turntable) are not timed

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, name: str, start) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((name, start, end))
        else:
            self.pending.append((name, start, time.perf_counter()))

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.in_step:
                return fn(*args, **kwargs)
            begin = self.start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(name, begin)

        return timed

    def end_step(self) -> dict[str, float]:
        """Sum this step's sections (ms); the last event's synchronize waits for the step's work."""
        totals: dict[str, float] = {}
        if self.cuda and self.pending:
            self.pending[-1][2].synchronize()
        for name, begin, end in self.pending:
            ms = begin.elapsed_time(end) if self.cuda else (end - begin) * 1000
            totals[name] = totals.get(name, 0.0) + ms
        self.pending = []
        if "step" in totals:
            inner = sum(v for k, v in totals.items() if k in ("render", "sds", "oracle", "optimizer"))
            totals["backward_and_losses"] = totals["step"] - inner
        self.steps.append(totals)
        return totals


def summarize(steps: list[dict[str, float]], skip: int) -> dict:
    """Median and mean ms of each section over the steps after the first `skip` (warm-up, compile)."""
    kept = steps[skip:] or steps
    names = sorted({name for step in kept for name in step})
    out = {"n_steps": len(steps), "n_summarized": len(kept)}
    for name in names:
        values = [step.get(name, 0.0) for step in kept]
        out[name] = {"median_ms": round(statistics.median(values), 2), "mean_ms": round(statistics.fmean(values), 2)}
    if steps:
        out["first_step_ms"] = {k: round(v, 1) for k, v in steps[0].items()}
    return out


# ----------------------------------------------------------------------------- the prior


class CostFaithfulGuidance:
    """Real SD SDS computed and back-propagated for its cost; the oracle's gradient for the update."""

    def __init__(self, sd_guidance, oracle: OracleGuidance, sections: Sections):
        self.sd_guidance = sd_guidance
        self.oracle = oracle
        self.sections = sections
        self.sd_grad_norm_sum = None  # device tensor: every SD gradient feeds it, so none can be skipped
        self.sd_steps = 0

    def sds_loss(self, images, cameras=None, lighting=None, background=None, views=None):
        begin = self.sections.start()
        shadow = images.detach().requires_grad_()
        self.sd_guidance.sds_loss(shadow, cameras, lighting, background, views=views).loss.backward()
        norm = torch.nan_to_num(shadow.grad.float().norm(), nan=0.0, posinf=0.0)
        self.sd_grad_norm_sum = norm if self.sd_grad_norm_sum is None else self.sd_grad_norm_sum + norm
        self.sd_steps += 1
        self.sections.stop("sds", begin)
        begin = self.sections.start()
        out = self.oracle.sds_loss(images, cameras, lighting, background)
        self.sections.stop("oracle", begin)
        return out


# where the instrumented steps record, the last system, and the in-run profile (--profile-step)
ACTIVE: dict = {"sections": None, "system": None, "profile_at": None, "profile": None}
PROFILED_STEPS = 5


def instrument_systems() -> None:
    """Time every RealFusionSystem's steps and their parts from outside (its renderer, optimizer and EMA
    objects are wrapped on its first step), into ACTIVE["sections"]. Installed once."""
    if getattr(RealFusionSystem, "_bench_original_step", None) is not None:
        return
    original = RealFusionSystem.training_step
    RealFusionSystem._bench_original_step = original

    def training_step(self):
        sections = ACTIVE["sections"]
        if getattr(self, "_bench_sections", None) is not sections:
            self.renderer.render = sections.wrap("render", type(self.renderer).render.__get__(self.renderer))
            self.optimizer.step = sections.wrap("optimizer", type(self.optimizer).step.__get__(self.optimizer))
            self.ema.update = sections.wrap("optimizer", type(self.ema).update.__get__(self.ema))
            self._bench_sections = sections
        ACTIVE["system"] = self
        if ACTIVE["profile_at"] is not None and self.step == ACTIVE["profile_at"]:
            return profiled_steps(self, original)  # these steps are neither timed nor summarized
        sections.in_step = True
        begin = sections.start()
        try:
            report = original(self)
        finally:
            sections.stop("step", begin)
            sections.in_step = False
        sections.end_step()
        return report

    RealFusionSystem.training_step = training_step


def profiled_steps(system, step) -> dict:
    """PROFILED_STEPS training steps under torch.profiler (the first, and the system's step counter
    advances by all of them): GPU busy fraction, top kernels, top host operators (ACTIVE["profile"])."""
    from profile_prior import kernel_summary, profiler

    synchronize = torch.cuda.synchronize if system.device.type == "cuda" else (lambda: None)
    at = system.step
    synchronize()
    with profiler(system.device) as prof:
        begin = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            report = step(system)
        synchronize()
        wall_ms = (time.perf_counter() - begin) * 1000 / PROFILED_STEPS
    ACTIVE["profile"] = {"from_step": at, "steps": PROFILED_STEPS, **kernel_summary(prof, PROFILED_STEPS, wall_ms)}
    ACTIVE["profile_at"] = None
    return report


def cost_faithful_prior(model: Path, mesh, cache_dir: Path, sections: Sections, holder: dict):
    """A prior factory for `reconstruct`: the real SD prior (textual inversion included), wrapped."""
    from engine.pipeline import stable_diffusion_prior

    real = stable_diffusion_prior(model=str(model), cache_dir=cache_dir)

    def make(cfg, reference, device, out, report):
        sd_guidance = real(cfg, reference, device, out, report)
        oracle = OracleGuidance(mesh, cfg.prior, torch.Generator().manual_seed(cfg.seed), gain=oracle_gain(cfg))
        holder["guidance"] = CostFaithfulGuidance(sd_guidance, oracle, sections)
        return holder["guidance"]

    return make


# ----------------------------------------------------------------------------- reference steps


def reference_steps(sd, cfg, mesh, device: torch.device, n: int) -> dict:
    """Plain-way steps in this process: eager NCHW UNet/VAE with diffusers' default (SDPA) attention, TI as
    4 x batch 1 accumulated, torch hash grid.

    Run before the reconstruction, while the weights are still NCHW (fast paths switch them to
    channels_last in place)."""
    from engine.cameras import reference_camera
    from engine.config import apply_overrides
    from engine.guidance import StableDiffusionGuidance, add_placeholder_token, text_embeddings_for_guidance
    from engine.guidance.textual_inversion import denoising_loss, training_batch
    from engine.harness.raycast import render_ground_truth
    from engine.system import ReferenceView

    eager = prior_modules(sd, "none", channels_last=False)
    ti = cfg.textual_inversion
    token_id = add_placeholder_token(sd, ti.placeholder, ti.initializer)
    prompt = ti.prompt.format(ti.placeholder)
    image = torch.ones(3, ti.resolution, ti.resolution, device=device)
    vector = torch.nn.Parameter(sd.text_encoder.get_input_embeddings().weight[token_id].detach().float().clone())
    optimizer = torch.optim.AdamW([vector], lr=ti.learning_rate, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=sd.dtype == torch.float16)
    generator = torch.Generator().manual_seed(0)
    ti_sections = Sections(device)

    def ti_step():
        begin = ti_sections.start()
        loss = 0.0
        for _ in range(ti.grad_accumulation):  # the official recipe, one micro-batch after the other
            latents, t, noise = training_batch(sd, image, ti.resolution, ti.batch_size, generator, eager)
            micro = denoising_loss(sd, latents, t, noise, vector, token_id, prompt, eager) / ti.grad_accumulation
            scaler.scale(micro).backward()
            loss += micro.item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ti_sections.stop("textual_inversion", begin)
        ti_sections.end_step()

    for _ in range(n + 2):
        ti_step()
    result = {"textual_inversion": summarize(ti_sections.steps, 2),
              "textual_inversion_layout": f"{ti.grad_accumulation} x batch {ti.batch_size}, accumulated, eager"}

    # one whole fit step at this preset, torch hash grid, eager SD with NCHW weights
    ref_cfg = apply_overrides(build_config_like(cfg), ["field.backend=torch", "prior.compile=none",
                                                      "prior.channels_last=false"])
    embeddings = text_embeddings_for_guidance(sd, prompt, None, token_id)
    sd_guidance = StableDiffusionGuidance(sd, embeddings, ref_cfg.prior, modules=eager)
    fit_sections = Sections(device)
    ACTIVE["sections"] = fit_sections
    guidance = CostFaithfulGuidance(sd_guidance, OracleGuidance(mesh, ref_cfg.prior, torch.Generator().manual_seed(0),
                                                                gain=oracle_gain(ref_cfg)),
                                    fit_sections)
    camera = reference_camera(ref_cfg.camera, ref_cfg.render.ref_resolution)
    truth = render_ground_truth(mesh, camera, supersample=1)
    reference = ReferenceView(truth.rgb[0].to(device), truth.mask[0].to(device))
    system = RealFusionSystem(ref_cfg, reference, guidance, device)
    for phase, step_index in (("coarse_albedo", 0), ("fine_shaded", int(0.7 * ref_cfg.fit.iterations))):
        start = len(fit_sections.steps)
        for _ in range(n + 2):
            system.step = step_index
            system.training_step()  # instrumented: records into fit_sections
        result[f"fit_{phase}"] = summarize(fit_sections.steps[start:], 2)
    result["fit_backend"] = type(system.field.encoding).__name__
    ACTIVE["system"] = None  # let the reference model go before the run loads its own
    return result


def build_config_like(cfg):
    from engine.config import ReconstructionConfig

    return ReconstructionConfig.from_dict(cfg.to_dict())


# ----------------------------------------------------------------------------- one preset


def run_preset(name: str, args, model: Path, workdir: Path, device: torch.device) -> dict:
    from PIL import Image

    from engine.harness.demo import photograph, write_ground_truth
    from engine.harness.evaluate import evaluate, summary
    from engine.harness.objects import make_object
    from engine.harness.raycast import ColoredMesh
    from engine.pipeline import reconstruct

    overrides = [f"field.backend={args.backend}"] + ([f"prior.compile={args.compile}"] if args.compile else [])
    overrides += list(args.overrides)
    if args.tiny:
        overrides = TINY_OVERRIDES + ["prior.dtype=fp32"] + overrides
    cfg = build_config(name, overrides, model=str(model))
    cfg.textual_inversion.cache = False  # pay for textual inversion every time
    outdir = workdir / f"out_{name}"
    mesh = make_object(args.object, cfg.camera, cfg.matting.object_fraction)
    outdir.mkdir(parents=True, exist_ok=True)
    photo = outdir / "input.png"
    Image.fromarray(photograph(mesh, cfg)).save(photo)
    write_ground_truth(mesh, outdir)
    colored = ColoredMesh.from_trimesh(mesh)
    result = {"benchmark": "time_to_mesh", "preset": name, "device": device_name(device), "versions": versions(),
              "weights": "tiny test SD (CPU smoke test)" if args.tiny else "SD 1.5 architecture, random weights",
              "object": args.object, "backend_requested": args.backend, "compile": cfg.prior.compile,
              "overrides": overrides, "config": {
                  "ti_steps": cfg.textual_inversion.steps, "ti_batch": cfg.textual_inversion.batch_size,
                  "ti_accumulation": cfg.textual_inversion.grad_accumulation,
                  "ti_accumulate_as_batch": cfg.textual_inversion.accumulate_as_batch,
                  "fit_iterations": cfg.fit.iterations, "step_size": cfg.render.step_size,
                  "random_resolution": cfg.render.random_resolution, "ref_resolution": cfg.render.ref_resolution,
                  "export_resolution": cfg.export.resolution, "texture_size": cfg.export.texture_size}}

    # reference steps first, on a model of their own (the run's model is loaded by the pipeline, as always)
    if args.reference_steps > 0:
        sd = load_stable_diffusion(str(model), device, cfg.prior.dtype)
        result["reference_steps"] = reference_steps(sd, cfg, colored, device, args.reference_steps)
        del sd
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    sections = Sections(device)
    ACTIVE["sections"], ACTIVE["system"] = sections, None
    ACTIVE["profile_at"], ACTIVE["profile"] = args.profile_step, None
    holder: dict = {}
    stages: dict[str, float] = {}
    peaks: dict[str, float] = {}
    ti_stamps: list[float] = []
    current = [None]
    start = time.perf_counter()

    def report(progress):
        now = time.perf_counter()
        if progress.stage != current[0]:
            if current[0] is not None and device.type == "cuda":
                peaks[current[0]] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
            current[0] = progress.stage
            stages.setdefault(progress.stage, now - start)
        if progress.stage == "textual_inversion":
            ti_stamps.append(now)  # after the step's loss was read: the step's work is done
        if now - start > args.max_seconds:
            raise BudgetExceeded(f"{progress.stage} step {progress.step}: past --max-seconds {args.max_seconds}")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    completed, error = True, None
    try:
        reconstruct(photo, outdir, cfg, device=str(device), prior=cost_faithful_prior(
            model, colored, workdir / f"cache_{name}", sections, holder), report=report, resume=False)
    except BudgetExceeded as exc:
        completed, error = False, str(exc)
    total = time.perf_counter() - start
    if device.type == "cuda" and current[0] is not None:
        peaks[current[0]] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    names = list(stages)
    stage_s = {stage: round((stages[nxt] if nxt else total) - stages[stage], 2)
               for stage, nxt in zip(names, names[1:] + [None])}
    ti_steps = [(b - a) * 1000 for a, b in zip(ti_stamps, ti_stamps[1:])]
    fit = summarize(sections.steps, 3)
    albedo_steps = int(cfg.render.albedo_only_fraction * cfg.fit.iterations)
    oracle_s = sum(step.get("oracle", 0.0) for step in sections.steps) / 1000
    guidance = holder.get("guidance")
    result.update({
        "completed": completed, "stopped": error,
        "backend": type(ACTIVE["system"].field.encoding).__name__ if ACTIVE["system"] else resolve_backend(args),
        "total_s": round(total, 1), "oracle_s": round(oracle_s, 1), "total_minus_oracle_s": round(total - oracle_s, 1),
        "stage_s": stage_s, "export_s": stage_s.get("export"),
        "steps": {
            "textual_inversion": {"n": len(ti_stamps), "median_ms": round(statistics.median(ti_steps), 2)
                                  if ti_steps else None, "mean_ms": round(statistics.fmean(ti_steps), 2)
                                  if ti_steps else None},
            "fit": fit,
            "fit_albedo_phase": summarize(sections.steps[:albedo_steps], 3),
            "fit_shaded_phase": summarize(sections.steps[albedo_steps:], 3),
        },
        "sd_gradient": None if guidance is None or guidance.sd_grad_norm_sum is None else {
            "steps": guidance.sd_steps, "mean_norm": float(guidance.sd_grad_norm_sum) / max(1, guidance.sd_steps)},
        "peak_gpu_memory_gib": {"max": max(peaks.values()) if peaks else None, **peaks} if device.type == "cuda"
        else None,
        "profile": ACTIVE["profile"],
    })
    if not completed:
        result["projection_note"] = "run stopped by --max-seconds; step medians above are measured, totals are not"
    elif (outdir / "mesh.glb").is_file() or (outdir / "mesh.obj").is_file():
        scores = evaluate(outdir, views=2, resolution=64) if args.tiny else evaluate(outdir)
        result["scores"] = {"fscore": scores["geometry"]["fscore"], "chamfer": scores["geometry"]["chamfer"],
                            "reference_psnr": scores["reference_view"]["psnr"],
                            "reference_mask_iou": scores["reference_view"]["mask_iou"],
                            "novel_psnr": scores["novel_views"]["psnr"], "summary": summary(scores)}
    export_report = outdir / "export.json"
    if export_report.is_file():
        data = json.loads(export_report.read_text())
        result["export"] = {k: data.get(k) for k in ("faces", "vertices", "file_bytes", "seconds")}
    return result


def resolve_backend(args) -> str:
    if args.backend != "auto":
        return args.backend
    return auto_backend()


# ----------------------------------------------------------------------------- main


def write(result: dict) -> Path:
    slug = result["device"].replace(" ", "-").lower()
    suffix = "" if result["backend_requested"] == "auto" else f"_{result['backend_requested']}"
    return save_result(result, f"time_to_mesh_{slug}_{result['preset']}{suffix}.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["fast", "standard", "paper"])
    parser.add_argument("--backend", choices=["auto", "torch", "triton", "tcnn"], default="auto")
    parser.add_argument("--compile", choices=MODES, help="the prior's execution (default: the preset's own)")
    parser.add_argument("--object", default="figure")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop a preset's run past this")
    parser.add_argument("--reference-steps", type=int, default=10, help="plain-way steps timed first (0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--profile-step", type=int, help=f"profile {PROFILED_STEPS} fit steps from this one "
                        "(torch.profiler: GPU busy fraction, top kernels and host operators; not in the timings)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny SD, a few steps at tiny sizes")
    parser.add_argument("--model-dir", help="keep the random-weight SD folder here and reuse it (saves a minute a run)")
    args = parser.parse_args()
    instrument_systems()
    if not args.tiny and not torch.cuda.is_available():
        print("time_to_mesh: no CUDA GPU here (use --tiny for the CPU smoke test); nothing measured.")
        return 0
    for name in args.presets:
        preset(name)  # unknown names fail here, before minutes of model building
    device = torch.device("cpu" if args.tiny else "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = model_folder(args.model_dir, workdir, args.tiny)
        for name in args.presets:
            result = run_preset(name, args, model, workdir, device)
            path = write(result)
            brief = {k: result.get(k) for k in ("preset", "completed", "total_s", "total_minus_oracle_s", "stage_s",
                                                "peak_gpu_memory_gib", "scores")}
            print(json.dumps(brief, indent=1), f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
