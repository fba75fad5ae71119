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


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`. From the CPU to a GPU through pinned memory without waiting: a plain copy
    from pageable memory synchronizes the stream, so the host would stop queueing kernels until the
    GPU ran dry (the loops draw their random numbers on the CPU, for reproducibility, several times a
    step). The caching host allocator keeps the pinned block until the copy is done. A broadcast view
    (elements sharing memory) is made contiguous first: pin_memory refuses it."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)
