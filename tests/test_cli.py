"""`realfusion reconstruct` end to end, on a tiny Stable Diffusion loaded from disk like real weights.

Every run here goes through the real command line: argument parsing, matting,
`from_pretrained`, textual inversion, the field fit with its schedule, previews,
checkpoints and the turntable; the bad-input tests check the one-line error, the
exit code and that nothing in the output folder claims to be finished.
"""

import json
import os

import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.errors import DeviceError, InputImageError, MissingWeightsError, OutputDirError
from synthetic_images import rgba_disc

TINY = [
    "matting.image_size=64",
    "textual_inversion.steps=4", "textual_inversion.grad_accumulation=1", "textual_inversion.resolution=32",
    "fit.iterations=6", "fit.preview_every=3", "fit.checkpoint_every=3",
    "fit.turntable_resolution=24", "fit.coarse_levels_masked=2",
    "render.ref_resolution=24", "render.random_resolution=24", "render.step_size=0.1", "render.occupancy_resolution=32",
    "field.n_levels=4", "field.log2_hashmap_size=10", "field.finest_resolution=32", "field.hidden_dim=16",
    "export.resolution=32", "export.texture_size=64", "export.max_faces=2000",
]


def reconstruct_args(image, out, model, cache, *extra):
    args = ["reconstruct", str(image), "-o", str(out), "--model", str(model), "--device", "cpu",
            "--preset", "fast", "--cache-dir", str(cache)]
    for override in TINY:
        args += ["--set", override]
    return args + list(extra)


def status(out):
    return json.loads((out / "status.json").read_text())


@pytest.fixture
def photo(tmp_path):
    return rgba_disc(tmp_path / "disc.png")


def test_reconstruct_writes_every_result_and_reports_done(tmp_path, photo, tiny_sd_dir, capsys):
    out = tmp_path / "out"
    assert main(reconstruct_args(photo, out, tiny_sd_dir, tmp_path / "cache")) == 0

    for name in ("reference.png", "reference_mask.png", "config.json", "embedding.pt", "field.pt",
                 "preview.png", "previews/step_000003.png", "previews/step_000006.png", "turntable.png",
                 "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert status(out)["state"] == "done" and status(out)["steps"] == 6

    turntable = Image.open(out / "turntable.png")
    assert turntable.size == (8 * 24, 2 * 24)  # 8 views; color row over normals row
    saved = torch.load(out / "field.pt", weights_only=False)
    assert saved["step"] == 6 and saved["config"]["fit"]["iterations"] == 6
    assert json.loads((out / "config.json").read_text())["prior"]["model"] == str(tiny_sd_dir)

    err = capsys.readouterr().err
    for stage in ("matting", "textual_inversion", "fit", "turntable"):
        assert stage in err  # one tqdm bar per stage


def test_second_run_reuses_the_cached_embedding_and_resumes_the_fit(tmp_path, photo, tiny_sd_dir, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert main(reconstruct_args(photo, out, tiny_sd_dir, cache)) == 0
    first = torch.load(out / "embedding.pt", weights_only=False)
    capsys.readouterr()

    # A longer run in the same folder resumes from the checkpoint (step 3 of 6 -> continues to 9).
    assert main(reconstruct_args(photo, out, tiny_sd_dir, cache, "--set", "fit.iterations=9")) == 0
    err = capsys.readouterr().err
    assert "textual_inversion" not in err  # the embedding came from the cache
    assert status(out)["steps"] == 9
    second = torch.load(out / "embedding.pt", weights_only=False)
    assert torch.equal(_vector(first), _vector(second))


def _vector(saved):
    return saved["vector"] if isinstance(saved, dict) else saved


# ------------------------------------------------------------------------- bad input


def run_failing(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_unreadable_image_is_a_one_line_error(tmp_path, tiny_sd_dir, capsys):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    code, line = run_failing(reconstruct_args(bad, out, tiny_sd_dir, tmp_path / "c"), capsys)
    assert code == InputImageError.exit_code
    assert line.startswith("error: ") and "photo.png" in line
    assert status(out)["state"] == "failed"
    assert not (out / "field.pt").exists()


def test_tiny_image_is_refused(tmp_path, tiny_sd_dir, capsys):
    small = tmp_path / "small.png"
    Image.new("RGBA", (20, 20), (255, 0, 0, 255)).save(small)
    code, line = run_failing(reconstruct_args(small, tmp_path / "out", tiny_sd_dir, tmp_path / "c"), capsys)
    assert code == InputImageError.exit_code and "20" in line


def test_empty_alpha_means_no_object_found(tmp_path, tiny_sd_dir, capsys):
    empty = tmp_path / "empty.png"
    Image.new("RGBA", (96, 96), (0, 0, 0, 0)).save(empty)
    code, line = run_failing(reconstruct_args(empty, tmp_path / "out", tiny_sd_dir, tmp_path / "c"), capsys)
    assert code == InputImageError.exit_code and "object" in line.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_names_the_fix(tmp_path, photo, tiny_sd_dir, capsys):
    args = reconstruct_args(photo, tmp_path / "out", tiny_sd_dir, tmp_path / "c")
    args[args.index("cpu")] = "cuda"
    code, line = run_failing(args, capsys)
    assert code == DeviceError.exit_code and "--device cpu" in line


def test_missing_weights_name_the_fix(tmp_path, photo, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code, line = run_failing(reconstruct_args(photo, out, "someone/not-a-model", tmp_path / "c"), capsys)
    assert code == MissingWeightsError.exit_code
    assert "someone/not-a-model" in line
    assert status(out)["state"] == "failed"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path, photo, tiny_sd_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, line = run_failing(reconstruct_args(photo, locked / "out", tiny_sd_dir, tmp_path / "c"), capsys)
    finally:
        locked.chmod(0o700)
    assert code == OutputDirError.exit_code and "-o" in line


def test_unknown_config_key_is_refused_before_any_work(tmp_path, photo, tiny_sd_dir, capsys):
    out = tmp_path / "out"
    code, line = run_failing(reconstruct_args(photo, out, tiny_sd_dir, tmp_path / "c", "--set", "fit.iters=3"),
                             capsys)
    assert code == 2 and "fit.iters" in line
    assert not out.exists()
