"""`realfusion batch` on the tiny Stable Diffusion: skip, resume, bad photos, and a Ray pool losing a worker.

The photos go through the real pipeline (matting, textual inversion, fit with checkpoints, export)
at the tiny sizes of test_cli.py. The Ray test starts a local cluster of two CPU workers, kills
the process of the worker running a photo once that photo has a checkpoint, and checks that the
batch still finishes everything, the killed photo going on from its checkpoint on another worker.
"""

import json
import os
import signal
import threading
import time

import pytest

from engine.batch import SUMMARY_FILE, BatchProgress, BatchSettings, run_batch
from engine.cli import main
from engine.errors import ConfigError, InputImageError
from synthetic_images import rgba_disc
from test_cli import TINY


def settings_for(model, cache, *extra, **changes) -> BatchSettings:
    return BatchSettings(preset="fast", model=str(model), device="cpu", cache_dir=cache,
                         overrides=[*TINY, *extra], **changes)


def batch_args(photos, out, model, cache, *extra):
    args = ["batch", str(photos), "-o", str(out), "--model", str(model), "--device", "cpu", "--preset", "fast",
            "--cache-dir", str(cache)]
    for override in TINY:
        args += ["--set", override]
    return args + list(extra)


def summary(out) -> dict:
    data = json.loads((out / SUMMARY_FILE).read_text())
    return {p["name"]: p for p in data["photos"]} | {"_counts": data["counts"]}


def folder_state(out, name) -> dict:
    return json.loads((out / name / "status.json").read_text())


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rgba_disc(folder / "disc.png")
    rgba_disc(folder / "small.png", radius=0.2)
    (folder / "notes.txt").write_text("not a photo: ignored")
    return folder


def test_batch_reports_a_bad_photo_and_skips_done_ones_on_the_next_run(tmp_path, photos, tiny_sd_dir, capsys):
    (photos / "broken.png").write_bytes(b"not a png")
    out, cache = tmp_path / "out", tmp_path / "cache"

    assert main(batch_args(photos, out, tiny_sd_dir, cache)) == 1  # one photo failed
    first = summary(out)
    assert set(first) == {"disc", "small", "broken", "_counts"}
    for name in ("disc", "small"):
        assert first[name]["state"] == "done" and folder_state(out, name)["state"] == "done"
        assert first[name]["attempts"] == 1 and first[name]["steps"] == 6 and first[name]["seconds"] > 0
        assert f"{name}/mesh.glb" in first[name]["files"] and f"{name}/field.pt" in first[name]["files"]
    broken = first["broken"]
    assert broken["state"] == "failed" and broken["attempts"] == 1  # its own fault: reported, not retried
    assert "broken.png" in broken["error"]["problem"] and broken["error"]["fix"]
    assert first["_counts"]["done"] == 2 and first["_counts"]["failed"] == 1
    assert "2 done" in capsys.readouterr().out

    field_written = (out / "disc" / "field.pt").stat().st_mtime_ns
    assert main(batch_args(photos, out, tiny_sd_dir, cache)) == 1
    second = summary(out)
    assert second["disc"]["skipped"] and second["small"]["skipped"]
    assert second["disc"]["seconds"] == first["disc"]["seconds"]  # carried over from the run that made it
    assert (out / "disc" / "field.pt").stat().st_mtime_ns == field_written  # not run again
    assert second["broken"]["state"] == "failed" and not second["broken"]["skipped"]


class StopAtStep(BatchProgress):
    """Stands for Ctrl-C: interrupts the batch when `name` reaches fit step `step`."""

    def __init__(self, name, step):
        self.name, self.step = name, step

    def photo_progress(self, name, progress):
        if name == self.name and progress.stage == "fit" and progress.step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_batch_resumes_the_photo_from_its_checkpoint(tmp_path, photos, tiny_sd_dir):
    out, cache = tmp_path / "out", tmp_path / "cache"
    settings = settings_for(tiny_sd_dir, cache)
    with pytest.raises(KeyboardInterrupt):
        run_batch(photos, out, settings, progress=StopAtStep("disc", 4))  # after its checkpoint at step 3
    interrupted = summary(out)
    assert interrupted["disc"]["state"] == "interrupted" and interrupted["small"]["state"] == "pending"
    assert (out / "disc" / "checkpoints" / "last.pt").is_file()
    assert folder_state(out, "disc")["state"] != "done"

    result = run_batch(photos, out, settings)
    disc, small = result.results["disc"], result.results["small"]
    assert disc.state == small.state == "done"
    assert disc.resumed_from_step == 3 and disc.steps == 6  # went on from the checkpoint, not from step 0
    assert small.resumed_from_step == 0
    assert summary(out)["disc"]["resumed_from_step"] == 3


def test_bad_batch_input_is_refused_before_any_work(tmp_path, tiny_sd_dir, photos, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(batch_args(empty, tmp_path / "out1", tiny_sd_dir, tmp_path / "c")) == InputImageError.exit_code
    assert "no photo" in capsys.readouterr().err
    assert main(batch_args(tmp_path / "missing", tmp_path / "out2", tiny_sd_dir, tmp_path / "c")) == 3
    code = main(batch_args(photos, tmp_path / "out3", tiny_sd_dir, tmp_path / "c", "--set", "fit.iters=3"))
    assert code == ConfigError.exit_code and "fit.iters" in capsys.readouterr().err
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out3").exists()
    # A Ray address nobody listens on: refused in seconds (Ray itself retries for minutes), no summary written.
    assert main(batch_args(photos, tmp_path / "out4", tiny_sd_dir, tmp_path / "c", "--ray", "127.0.0.1:1")) == 2
    assert "Nothing answers at the Ray address 127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "out4" / SUMMARY_FILE).exists()


# ------------------------------------------------------------------------------------------------ Ray


class KillWhenCheckpointed(threading.Thread):
    """Watches batch.json; the first running photo that has a checkpoint gets its worker's process killed."""

    def __init__(self, out):
        super().__init__(daemon=True)
        self.out, self.killed, self.done = out, None, threading.Event()

    def run(self):
        while not self.done.is_set() and self.killed is None:
            try:
                photos = json.loads((self.out / SUMMARY_FILE).read_text())["photos"]
            except (OSError, ValueError, KeyError):
                photos = []
            for photo in photos:
                if (photo["state"] == "running" and photo["worker"] and photo["attempts"] == 1
                        and (self.out / photo["name"] / "checkpoints" / "last.pt").is_file()):
                    os.kill(photo["worker"]["pid"], signal.SIGKILL)
                    self.killed = (photo["name"], photo["worker"]["pid"])
                    return
            time.sleep(0.05)


def test_ray_batch_survives_a_killed_worker_and_resumes_its_photo(tmp_path, photos, tiny_sd_dir, monkeypatch):
    import ray  # installed by scripts/setup (the `ray` extra); a missing one is a setup error

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rgba_disc(photos / "large.png", radius=0.4)
    out = tmp_path / "out"
    # Long enough a fit (checkpoints every 2 of 16 steps) that the kill lands mid-photo, after a checkpoint.
    settings = settings_for(tiny_sd_dir, tmp_path / "cache", "fit.iterations=16", "fit.checkpoint_every=2",
                            "fit.preview_every=8", ray="local", workers=2)
    killer = KillWhenCheckpointed(out)
    killer.start()
    try:
        result = run_batch(photos, out, settings)
    finally:
        killer.done.set()
    assert not ray.is_initialized()  # the cluster this batch started is shut down again

    assert killer.killed is not None, "no photo reached a checkpoint while running"
    name, pid = killer.killed
    states = {n: (r.state, r.steps) for n, r in result.results.items()}
    assert states == {n: ("done", 16) for n in ("disc", "large", "small")}
    assert all(folder_state(out, n)["state"] == "done" for n in states)

    killed = result.results[name]
    assert killed.attempts == 2 and [w["pid"] for w in killed.lost_workers] == [pid]
    assert killed.worker["pid"] != pid  # finished by another worker ...
    assert killed.resumed_from_step >= 2  # ... which went on from the checkpoint, not from step 0
    others = [r for n, r in result.results.items() if n != name]
    assert all(r.attempts == 1 and r.resumed_from_step == 0 for r in others)
    assert len({r.worker["pid"] for r in result.results.values()}) >= 2  # two workers shared the batch
    assert summary(out)[name]["resumed_from_step"] == killed.resumed_from_step


def test_photos_with_one_stem_get_their_own_folders_and_hidden_files_are_left_out(tmp_path):
    from engine.batch import find_photos

    rgba_disc(tmp_path / "cup.png")
    (tmp_path / "cup.JPG").write_bytes(b"the folder listing does not open the files")
    rgba_disc(tmp_path / "vase.png")
    rgba_disc(tmp_path / ".hidden.png")
    (tmp_path / "sub").mkdir()
    rgba_disc(tmp_path / "sub" / "deep.png")
    assert [p.name for p in find_photos(tmp_path)] == ["cup.JPG", "cup.png", "vase"]


def test_zero_workers_is_refused(tmp_path, photos, tiny_sd_dir, capsys):
    assert main(batch_args(photos, tmp_path / "out", tiny_sd_dir, tmp_path / "c", "--workers", "0")) == 2
    assert "--workers" in capsys.readouterr().err and not (tmp_path / "out").exists()
