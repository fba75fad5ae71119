"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (tiny_sd) import as top-level modules

from tiny_sd import build_tiny_stable_diffusion  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Stable Diffusion folder (32 px), built once per test session."""
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def blender_python() -> Path:
    """The Python of the bpy environment; scripts/setup makes it. Missing is a setup error, not a skip."""
    from blender_runner import blender_python_path

    path = blender_python_path()
    if not path.exists():
        pytest.fail(f"No Blender environment at {path}: run scripts/setup (or set REALFUSION_BLENDER_PYTHON).")
    return path
