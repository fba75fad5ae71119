"""Joining a Ray cluster (or starting a local one): shared by `realfusion batch --ray` and `serve --ray`.

Below batch and server, above nothing of the engine: it only knows Ray and where the engine's code is.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import EngineError

CONNECT_FIX = ("Check the address printed by `ray start --head` (e.g. --ray 10.0.0.5:6379, or --ray auto on a "
               "cluster node); a cluster with Ray's token authentication also needs RAY_AUTH_MODE=token and its "
               "token (~/.ray/auth_token); or use --ray local.")


def import_ray(what: str = "A Ray batch (--ray or --workers)"):
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise EngineError(f"{what} needs the `ray` package, which is not installed.",
                          "Install the ray extra: pip install 'realfusion-blender[ray]'.") from exc
    return ray


def connect(address: str | None, workers: int | None = None, what: str = "A Ray batch (--ray or --workers)") -> bool:
    """Join the cluster at `address`, or start a local one (None or "local"); True when this call connected
    (and the caller should shut Ray down at its end), False when this process was connected already."""
    ray = import_ray(what)
    if ray.is_initialized():
        return False  # the caller (a test, the benchmark) already connected
    if address in (None, "local"):
        engine_root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (engine_root, os.environ.get("PYTHONPATH")) if p)
        # address="local": always a new cluster, never one a `ray start` left on this machine
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers or 1),
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})  # this engine, on every worker
        return True
    check_reachable(address, CONNECT_FIX)
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineError(f"Could not connect to the Ray cluster at {address} ({exc}).", CONNECT_FIX) from exc
    return True


def check_gpu_share(share: float) -> None:
    """--gpus-per-worker: a fraction of one GPU, or a whole number of them."""
    if share <= 0 or (share > 1 and share != int(share)):
        raise EngineError(f"--gpus-per-worker {share} is not understood.",
                          "Use 1 (the default), a fraction such as 0.5, or a whole number.")


def check_reachable(address: str, fix: str, timeout_s: float = 10.0) -> None:
    """A host:port nobody listens on fails here in seconds (Ray itself keeps retrying for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise EngineError(f"Nothing answers at the Ray address {address} ({exc.strerror or exc}).", fix) from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
