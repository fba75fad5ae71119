"""Which torch device a command runs on, refused with a fix when it is not there."""

from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine.",
                          "Check `nvidia-smi` and that a CUDA build of torch is installed, "
                          "or run with --device cpu (much slower).")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DeviceError(f"Unknown device {name!r}.", "Use --device cuda, cuda:N or cpu.")
    return torch.device(name)
