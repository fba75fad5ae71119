"""The add-on in a real Blender window under Xvfb, against the real engine server (tiny model).

Debian's `blender` (3.4) and `xvfb-run` (scripts/setup installs them with apt-get when it runs
as root); without them this test is skipped, saying so. tests/blender/gui_reconstruct.py does
the work inside Blender: the default startup scene, the real modal Reconstruct operator with
its timer firing, previews on, the import, a render through the new camera, one Ctrl+Z, a
wrong token, and screenshots of the panel.

    REALFUSION_UPDATE_SCREENSHOTS=1 pytest tests/test_blender_gui.py   # also refresh docs/blender-*.png
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blender_runner import ROOT
from synthetic_images import rgba_disc
from test_blender_e2e import E2E_OVERRIDES
from test_server import Server

BLENDER = shutil.which("blender")
XVFB_RUN = shutil.which("xvfb-run")
SCRIPT = ROOT / "tests" / "blender" / "gui_reconstruct.py"
SHOTS = ("panel_idle", "panel_running", "panel_done", "panel_error")

pytestmark = pytest.mark.skipif(
    BLENDER is None or XVFB_RUN is None,
    reason="needs Blender and Xvfb (apt-get install blender xvfb xauth; scripts/setup does it as root)")


def off_center_photo(folder: Path) -> Path:
    """A 144x96 RGBA photo with the disc left of the center and low: the engine re-frames it (centers and
    scales it on a square), so lining the photo up behind the camera needs that framing undone."""
    disc = np.asarray(Image.open(rgba_disc(folder / "disc96.png")))
    photo = np.zeros((96, 144, 4), np.uint8)
    photo[8:96, 20:116] = disc[:88]  # the disc (radius 29 px around 47.5) ends above the bottom edge
    path = folder / "disc.png"
    Image.fromarray(photo).save(path)
    return path


@pytest.mark.slow
def test_reconstruct_in_a_blender_window_then_undo_once(tmp_path, tiny_sd_dir):
    server = Server(tmp_path / "jobs", tiny_sd_dir, tmp_path / "cache", tmp_path / "server.log")
    shots = tmp_path / "shots"
    shots.mkdir()
    report_path = tmp_path / "report.json"
    try:
        photo = off_center_photo(tmp_path)
        overrides = tmp_path / "overrides.json"
        overrides.write_text(json.dumps(E2E_OVERRIDES))
        env = dict(os.environ, OMP_NUM_THREADS="1", BLENDER_USER_CONFIG=str(tmp_path / "config"),
                   BLENDER_USER_SCRIPTS=str(tmp_path / "scripts"))
        run = subprocess.run(
            [XVFB_RUN, "-a", "-s", "-screen 0 1280x1280x24", BLENDER, "--factory-startup",
             "--enable-event-simulate", "--python", str(SCRIPT), "--", f"http://127.0.0.1:{server.port}",
             str(photo), str(report_path), str(overrides), str(server.jobs_dir), str(shots)],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    finally:
        server.stop()
    output = (run.stdout[-3000:] + run.stderr[-3000:])
    assert report_path.exists(), f"Blender ended without a report (crashed? rc={run.returncode}):\n{output}"
    report = json.loads(report_path.read_text())
    assert report["error"] is None, report["error"] + output
    assert run.returncode == 0, output
    job = report["job"]

    # the real modal operator followed the job to its end and imported it, previews on the way
    assert job["imported"] and job["collection"] == "disc", (job, output)
    assert "running" in report["states"] and report["previews"] >= 2
    assert report["progress"] == sorted(report["progress"])
    assert "textual_inversion" not in " ".join(report["messages"])  # words, not identifiers

    # Debian's Blender 3.4 glTF importer breaks on numpy 1.24 (np.bool): the panel names the cause, not the file
    if report.get("gltf_failure"):
        state, kind, problem, fix = report["gltf_failure"]
        assert state == "done" and kind == "import" and "bool" in problem and "numpy" in problem, report["gltf_failure"]

    # the default scene: the Cube around the origin would hide the mesh; it is hidden and named
    assert {"Cube", "Light", "Camera"} <= set(report["startup_objects"])
    assert "Cube" in job["hidden"] and "Cube" not in report["visible_objects"]
    assert report["camera"]["name"] == "disc Camera" and report["camera"]["background_is_photo"]
    width, height = report["camera"]["resolution"]
    assert abs(width / height - 1.5) < 0.01  # the camera frames the whole photo (144 x 96)...
    assert report["camera"]["shift"] != [0.0, 0.0]  # ...which the engine had re-centered
    render = report["render"]
    # The mesh is where the photo's object is. This 200-step tiny fit's silhouette moves with float rounding:
    # 0.932 at stop 25's code, 0.898 at stop 26's (the transmittance as exp of a sum instead of a product),
    # 0.868 / 0.869 with 300 steps or a finer export; 0.934 at stop 27 with the e2e overrides' 96^3 export, on
    # a fresh setup where 64^3 gave the e2e test 0.896. A placement error is larger: the disc's radius here is
    # 18 px, and shifting it by 3 px alone gives an IoU of about 1 - 4 * 3 / (pi * 18) = 0.79.
    assert render["iou"] >= 0.85, render
    assert render["other_in_mask"] == 0, render  # and nothing stands in front of it

    # one Ctrl+Z takes back the import, and only that
    undone = report["after_undo"]
    assert undone["jobs"] == undone["jobs_before"] and undone["job"]["job_id"] == job["job_id"], undone
    assert undone["job"]["state"] == "done" and not undone["job"]["imported"] and undone["job"]["glb"]
    assert "disc" not in undone["collections"] and "disc Camera" not in undone["objects"]
    assert undone["camera"] == "Camera" and "Cube" in undone["visible_objects"]

    # a wrong token: where to set it, in the add-on's words
    problem, fix, kind = report["token_error"]
    assert kind == "auth" and "Token" in fix and "preferences" in fix and "curl" not in fix, report["token_error"]

    for name in SHOTS:
        shot = shots / f"{name}.png"
        assert shot.is_file(), name
        image = np.asarray(Image.open(shot).convert("RGB"))
        assert image.shape[0] > 200 and image.std() > 5, (name, image.shape)  # a drawn panel, not a blank
    if os.environ.get("REALFUSION_UPDATE_SCREENSHOTS"):
        for name in SHOTS:
            small = Image.open(shots / f"{name}.png").convert("RGB").quantize(colors=96)  # UI: few colors
            small.save(ROOT / "docs" / f"blender-{name}.png", optimize=True)
