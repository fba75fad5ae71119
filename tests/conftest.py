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
