"""bench/compare_methods.py --from: one table and issue 13's verdicts from earlier calls' results files."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "bench" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_row(folder: Path, method: str, preset: str, psnr: float, novel: float, f05: float, f02: float) -> dict:
    """A run as compare_methods records it (before it kept F@0.02: that is read from its eval.json)."""
    outdir = folder / f"box_{preset}_{method}"
    outdir.mkdir(parents=True)
    (outdir / "eval.json").write_text(json.dumps({"geometry": {"fscore": f05, "fscore_at": {"0.05": f05, "0.02": f02}}}))
    return {"object": "box", "preset": preset, "method": method, "wall_s": 10.0, "exit_code": 0, "outdir": str(outdir),
            "mesh_reference_psnr": psnr, "mesh_reference_ssim": 0.9, "mesh_reference_iou": 0.97,
            "field_reference_psnr": psnr, "field_reference_ssim": 0.9, "novel_psnr": novel, "fscore": f05}


def test_collect_merges_calls_filters_by_method_and_reads_the_finer_fscore(tmp_path):
    bench = load_bench()
    first = tmp_path / "first.json"  # RealFusion and an old ConRad at demo; only RealFusion's row is taken
    first.write_text(json.dumps({"runs": [run_row(tmp_path / "a", "realfusion", "demo", 25.0, 24.0, 1.0, 0.957),
                                          run_row(tmp_path / "a", "conrad", "demo", 20.0, 20.0, 0.5, 0.25)]}))
    second = tmp_path / "second.json"
    second.write_text(json.dumps({"runs": [run_row(tmp_path / "b", "conrad", "demo", 31.0, 23.5, 1.0, 0.943)]}))
    assert bench.collect([f"{first}#realfusion", str(second)], "merged", readme=False, results=tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "methods_merged.json").read_text())
    assert [(r["method"], r["fscore_002"]) for r in result["runs"]] == [("realfusion", 0.957), ("conrad", 0.943)]
    assert result["targets"]["box/demo"] == {"mesh_reference_psnr_ok": True, "novel_psnr_not_worse": False,
                                             "fscore_not_worse": True}
    table = (tmp_path / "out" / "methods_merged.md").read_text()
    assert "| box | demo | conrad | 31.00 |" in table and "| 0.943 |" in table and "20.00" not in table
