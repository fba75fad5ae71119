"""The output folder never holds a torn file or a status that lies."""

import errno
import os

import pytest

from engine import outputs
from engine.errors import OutputDirError
from engine.outputs import OutputDir, atomic_write_bytes


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "a" / "b.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["b.bin"]


def test_full_disk_is_a_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "field.pt"
    atomic_write_bytes(path, b"good")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", disk_full)
    with pytest.raises(OutputDirError, match="full"):
        atomic_write_bytes(path, b"half")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["field.pt"]  # no temporary left behind


def test_output_folder_below_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="-o"):
        OutputDir(blocker / "out")


def test_status_round_trip(tmp_path):
    out = OutputDir(tmp_path / "o")
    assert out.read_status() is None
    out.set_status("running", "fit", steps=3)
    status = out.read_status()
    assert status["state"] == "running" and status["stage"] == "fit" and status["steps"] == 3


def test_results_are_readable_by_other_programs(tmp_path):
    previous = os.umask(0o022)
    try:
        path = tmp_path / "mesh.glb"
        atomic_write_bytes(path, b"glb")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
