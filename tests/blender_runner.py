"""Running code inside Blender (the `bpy` module) from the engine's test suite.

bpy 5.0.1 needs numpy<2 and the engine needs numpy>=2, so Blender lives in its own
environment (`.venv-blender`, made by scripts/setup) and tests talk to it through a
subprocess, exactly as the add-on and the engine talk to each other in real use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blender_python_path() -> Path:
    return Path(os.environ.get("REALFUSION_BLENDER_PYTHON", ROOT / ".venv-blender" / "bin" / "python"))


def run_blender_script(script: Path, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run `script` with the bpy environment's Python; raise with its output when it fails."""
    python = blender_python_path()
    result = subprocess.run([str(python), str(script), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError(f"{script.name} failed in Blender ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def engine_python_path() -> Path:
    return Path(sys.executable)
