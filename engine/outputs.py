"""The output folder of a reconstruction: every file written atomically, a status that tells the truth.

`status.json` says `running` from the first byte written to the last, `done` only
after every result is in place, and `failed` (with the message) otherwise, so a
half-finished folder never looks complete. Files are written to a temporary name
in the same folder and renamed, so a crash or a full disk never leaves a torn file.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DiskFullError, OutputDirError

STATUS_FILE = "status.json"
FIELD_REFERENCE_FILE = "field_reference.png"  # the fitted field seen from the reference camera (RGBA)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for other programs too
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(f"The disk holding {path.parent} is full.",
                                "Free some space (or pick another output folder) and run again.") from exc
        raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, raw or already turned into DiskFullError by the writers here."""
    if isinstance(exc, DiskFullError):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files that atomic_write_bytes leaves when its process is killed mid-write
    (".<name>.<random>.tmp", and the writable probe); returns how many. Run only where no writer is live."""
    removed = 0
    for path in Path(folder).rglob(".*"):
        if path.is_file() and not path.is_symlink() and (path.name.endswith(".tmp") or path.name == ".write-test"):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def atomic_torch_save(path: Path, obj) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def to_uint8(image) -> np.ndarray:
    """Float image in [0,1] (tensor or array, HxWxC or HxW) -> uint8 array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: Path, image) -> None:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def image_grid(rows: list[list]) -> np.ndarray:
    """Tile equally sized HxWx3 float images into one array, row by row."""
    return np.concatenate([np.concatenate([_as_array(im) for im in row], axis=1) for row in rows], axis=0)


def _as_array(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    return image


class OutputDir:
    """One reconstruction's folder: checked writable up front, with a status file and atomic writers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._started = time.time()
        self._check_writable()

    def _check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(f"The disk holding {self.path} is full.",
                                    "Free some space (or pick another output folder) and run again.") from exc
            raise OutputDirError(f"Cannot write to the output folder {self.path} ({exc.strerror}).",
                                 "Pick a folder you can write to with -o, or fix its permissions.") from exc

    def file(self, name: str) -> Path:
        return self.path / name

    def read_status(self) -> dict | None:
        try:
            return json.loads(self.file(STATUS_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def set_status(self, state: str, stage: str = "", message: str = "", **extra) -> None:
        status = {"state": state, "stage": stage, "message": message,
                  "started": self._started, "updated": time.time(), **extra}
        atomic_write_json(self.file(STATUS_FILE), status)
