"""The Blender add-on (realfusion_blender/) inside Blender: the bpy module in .venv-blender.

tests/blender/addon_checks.py runs every check in one Blender process (starting bpy is the
slow part) and writes a report; each check is one test here. The extension is built and
validated with the extension CLI that ships with Blender, and installed the way a user
installs it (Install from Disk), which also proves the add-on works as `bl_ext.*.realfusion`.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import blender_assets
from blender_runner import ROOT, run_blender_script

CHECKS_SCRIPT = ROOT / "tests" / "blender" / "addon_checks.py"
CHECKS = [node.name for node in ast.parse(CHECKS_SCRIPT.read_text()).body
          if isinstance(node, ast.FunctionDef) and node.name.startswith("check_")]
MANIFEST = ROOT / "blender_manifest.toml"  # the design card's place: the repository's top level


@pytest.fixture(scope="session")
def blender_assets_json(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blender_assets")
    path = folder / "assets.json"
    path.write_text(json.dumps(blender_assets.build(folder / "files")))
    return path


@pytest.fixture(scope="session")
def addon_report(blender_python, blender_assets_json, tmp_path_factory) -> dict:
    report = tmp_path_factory.mktemp("addon_report") / "report.json"
    result = run_blender_script(CHECKS_SCRIPT, report, blender_assets_json, timeout=240)
    data = json.loads(report.read_text())
    data["_output"] = result.stdout[-4000:] + result.stderr[-4000:]
    return data


@pytest.mark.parametrize("check", CHECKS)
def test_addon_in_blender(check, addon_report):
    result = addon_report.get(check)
    assert result is not None, f"{check} did not run:\n{addon_report['_output']}"
    assert result["ok"], f"{check} failed in Blender:\n{result['error']}"


def test_manifest_says_what_blender_and_the_issue_ask():
    manifest = tomllib.loads(MANIFEST.read_text())
    assert manifest["schema_version"] == "1.0.0" and manifest["id"] == "realfusion"
    assert manifest["name"] == "RealFusion" and manifest["type"] == "add-on"
    assert manifest["blender_version_min"] == "4.2.0"
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    assert not manifest["tagline"].endswith((".", "!", "?")) and len(manifest["tagline"]) <= 64
    assert manifest["permissions"] == {"network": "Talks to the local RealFusion engine",
                                       "files": "Reads the photo and writes the imported mesh"}
    assert not (ROOT / "realfusion_blender" / "blender_manifest.toml").exists(), \
        "one manifest only: the top-level one, which scripts/build_extension copies into the zip"


def test_addon_imports_nothing_outside_the_standard_library():
    """No torch, numpy, requests...: Blender's Python has only the standard library (and bpy)."""
    allowed = set(sys.stdlib_module_names) | {"bpy", "mathutils", "bpy_extras", "addon_utils"}
    for path in sorted((ROOT / "realfusion_blender").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_extension_builds_validates_and_installs(blender_python, tmp_path):
    """scripts/build_extension makes the zip with Blender's CLI; `blender_ext.py validate` accepts it;
    Blender installs it from disk and enables it as an extension."""
    env = dict(os.environ, REALFUSION_BLENDER_PYTHON=str(blender_python))
    built = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_extension"), "--output-dir",
                            str(tmp_path), "--validate"], capture_output=True, text=True, env=env, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    version = tomllib.loads(MANIFEST.read_text())["version"]
    zip_path = tmp_path / f"realfusion-{version}.zip"
    assert zip_path.is_file() and str(zip_path) in built.stdout

    # validate once more, directly with the CLI found inside the bpy module
    scripts = next((blender_python.parent.parent / "lib").glob("python3*/site-packages/bpy/*/scripts"))
    cli = scripts / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    validated = subprocess.run([str(blender_python), str(cli), "validate", str(zip_path)], capture_output=True,
                               text=True, timeout=60)
    assert validated.returncode == 0 and "Success" in validated.stdout, validated.stdout + validated.stderr

    names = zipfile.ZipFile(zip_path).namelist()
    assert "blender_manifest.toml" in names and "__init__.py" in names and "operators.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    addon = {p.name for p in (ROOT / "realfusion_blender").iterdir() if p.is_file() and p.suffix != ".pyc"}
    assert set(names) == addon | {"blender_manifest.toml"}, set(names) ^ addon  # the add-on, nothing else
    assert zipfile.ZipFile(zip_path).read("blender_manifest.toml") == MANIFEST.read_bytes()

    # the legacy zip for Blender 3.6-4.1: the folder realfusion_blender/ with bl_info, no manifest
    legacy = zipfile.ZipFile(tmp_path / f"realfusion-{version}-legacy.zip").namelist()
    assert "realfusion_blender/__init__.py" in legacy and not [n for n in legacy if n.endswith(".toml")]
    info = next(node for node in ast.parse((ROOT / "realfusion_blender" / "__init__.py").read_text()).body
                if isinstance(node, ast.Assign) and node.targets[0].id == "bl_info")
    bl_info = ast.literal_eval(info.value)
    assert bl_info["blender"] == (3, 6, 0) and bl_info["name"] == "RealFusion"
    assert ".".join(map(str, bl_info["version"])) == tomllib.loads(MANIFEST.read_text())["version"]

    user = tmp_path / "blender_user"
    installing = subprocess.run([str(blender_python), str(ROOT / "tests" / "blender" / "install_extension.py"),
                                 str(zip_path), str(tmp_path / "installed.json")], capture_output=True, text=True,
                                timeout=120, env=dict(os.environ, BLENDER_USER_RESOURCES=str(user)))
    assert installing.returncode == 0, installing.stdout[-3000:] + installing.stderr[-3000:]
    installed = json.loads((tmp_path / "installed.json").read_text())
    assert installed["module"].startswith("bl_ext.") and installed["module"].endswith(".realfusion"), installed
    assert installed["panel"] and installed["scene_property"] and installed["preferences_url"] == \
        "http://127.0.0.1:8765"
    assert installed["unregistered"]
