"""Does HashGridEncoding (pure PyTorch) agree with tiny-cuda-nn's HashGrid? (GPU only)

Run on a CUDA machine with tinycudann installed:

    python bench/hashgrid_agreement.py [--points-log2 18] [--repeats 20]

1. builds `tinycudann.Encoding(3, hash_grid_config(...), dtype=torch.float32)` and a
   `HashGridEncoding` of the same config, and checks that the parameter counts agree;
2. copies tcnn's initial params (uniform in [-1e-4, 1e-4]) into ours and compares the
   outputs on 2^18 random points and the parameter gradients of a random-weighted sum;
3. the other way round: random O(1) params set in ours, copied into tcnn, same comparison
   (O(1) values make interpolation differences visible);
4. times forward+backward of both (median of 20, CUDA events).

Writes bench/results/hashgrid_agreement.json (and $OUT/hashgrid_agreement.json when $OUT is
set). Exits 1 when outputs or gradients differ by more than 1e-3 relative, 0 otherwise;
also 0, with a message, when CUDA or tinycudann is missing (nothing to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from engine.fields.hashgrid import HashGridEncoding, hash_grid_config

TOLERANCE = 1e-3  # relative
RESULTS = Path(__file__).resolve().parent / "results" / "hashgrid_agreement.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points-log2", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--n-levels", type=int, default=16)
    parser.add_argument("--n-features-per-level", type=int, default=2)
    parser.add_argument("--log2-hashmap-size", type=int, default=19)
    parser.add_argument("--base-resolution", type=int, default=16)
    parser.add_argument("--finest-resolution", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def import_tcnn():
    """tinycudann, or None with the reason printed."""
    if not torch.cuda.is_available():
        print("hashgrid_agreement: CUDA is not available; nothing to compare (skipped).")
        return None
    try:
        import tinycudann
    except Exception as error:  # ImportError, or a binding built for another torch/CUDA
        print(f"hashgrid_agreement: tinycudann does not import ({error!r}); nothing to compare (skipped).")
        return None
    return tinycudann


def tcnn_version(tcnn) -> str:
    try:
        from importlib.metadata import version

        return version("tinycudann")
    except Exception:
        return str(getattr(tcnn, "__version__", "unknown"))


def build_tcnn(tcnn, config: dict):
    """tcnn.Encoding in float32 when the binding takes a dtype (older ones do not)."""
    try:
        return tcnn.Encoding(n_input_dims=3, encoding_config=config, dtype=torch.float32), "float32"
    except TypeError:
        encoding = tcnn.Encoding(n_input_dims=3, encoding_config=config)
        return encoding, str(getattr(encoding, "dtype", "tcnn default"))


def relative(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Differences of a from the reference b: max abs, max abs / max |b|, and normwise."""
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = b.abs().max().item() or 1.0
    norm = b.norm().item() or 1.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale, "norm_rel": (a - b).norm().item() / norm}


def compare(ours: HashGridEncoding, theirs, points: torch.Tensor, seed: int) -> dict:
    """Outputs and param gradients of a random-weighted sum, ours vs tcnn's."""
    generator = torch.Generator(device=points.device).manual_seed(seed)
    weights = torch.randn(points.shape[0], ours.output_dim, device=points.device, generator=generator)
    results = {}
    outputs, grads = [], []  # [ours, tcnn's]
    for module in (ours, theirs):
        module.zero_grad(set_to_none=True)
        out = module(points).float()
        (out * weights).sum().backward()
        outputs.append(out.detach())
        grads.append(module.params.grad.detach().float().clone())
    results["output"] = relative(outputs[0], outputs[1])
    results["param_grad"] = relative(grads[0], grads[1])
    results["output_abs_max"] = outputs[1].abs().max().item()
    return results


def time_forward_backward(module, n_outputs: int, points: torch.Tensor, repeats: int) -> dict:
    """Median / min ms of forward + backward (random output gradient), CUDA events, after 3 warm-ups."""
    grad_out = torch.randn(points.shape[0], n_outputs, device=points.device)
    times = []
    for i in range(repeats + 3):
        module.zero_grad(set_to_none=True)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module(points).float().backward(grad_out)
        stop.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(stop))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def write(report: dict) -> None:
    text = json.dumps(report, indent=2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "hashgrid_agreement.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


def main() -> int:
    args = parse_args()
    tcnn = import_tcnn()
    if tcnn is None:
        return 0

    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    sizes = (
        args.n_levels,
        args.n_features_per_level,
        args.log2_hashmap_size,
        args.base_resolution,
        args.finest_resolution,
    )
    config = hash_grid_config(*sizes)
    theirs, tcnn_dtype = build_tcnn(tcnn, config)
    theirs = theirs.to(device)
    ours = HashGridEncoding(*sizes).to(device)
    points = torch.rand(2**args.points_log2, 3, device=device)

    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tinycudann": tcnn_version(tcnn),
        "tcnn_dtype": tcnn_dtype,
        "config": config,
        "n_points": points.shape[0],
        "n_params": {"ours": ours.params.numel(), "tcnn": theirs.params.numel()},
        "tolerance_rel": TOLERANCE,
    }
    if ours.params.numel() != theirs.params.numel():
        report["agree"] = False
        report["problem"] = "parameter counts differ: the level layout does not match tcnn's"
        write(report)
        return 1

    # tcnn -> ours: tcnn's own initialisation.
    with torch.no_grad():
        ours.params.copy_(theirs.params.float())
    report["tcnn_init_params"] = {
        "init_abs_max": theirs.params.abs().max().item(),
        **compare(ours, theirs, points, args.seed),
    }

    # ours -> tcnn: O(1) random params.
    with torch.no_grad():
        ours.params.uniform_(-1.0, 1.0)
        theirs.params.copy_(ours.params.to(theirs.params.dtype))
    report["random_params"] = compare(ours, theirs, points, args.seed + 1)

    report["timing"] = {
        "ours": time_forward_backward(ours, ours.output_dim, points, args.repeats),
        "tcnn": time_forward_backward(theirs, ours.output_dim, points, args.repeats),
    }
    report["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    worst = max(
        report[case][quantity]["max_rel"]
        for case in ("tcnn_init_params", "random_params")
        for quantity in ("output", "param_grad")
    )
    report["worst_max_rel"] = worst
    report["agree"] = worst <= TOLERANCE
    write(report)
    if not report["agree"]:
        print(f"hashgrid_agreement: DISAGREE, worst relative error {worst:.3g} > {TOLERANCE}", file=sys.stderr)
        return 1
    print(f"hashgrid_agreement: agree, worst relative error {worst:.3g} <= {TOLERANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
