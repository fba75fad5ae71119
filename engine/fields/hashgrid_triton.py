"""Fused Triton kernels for the hash-grid encoding: the fast path when tinycudann is missing.

`TritonHashGridEncoding` is `HashGridEncoding` (same tables, same `params`, same state_dict,
same tcnn-compatible layout and hashing) with its forward and backward each done by one
Triton kernel instead of ~40 PyTorch ops over [N, levels, 8] tensors:

* forward: one program per block of points; it loops over the levels, and for each finds
  the cell (`pos = fma(x, scale, 0.5)`), the 8 corners' table rows (dense row-major index or
  tcnn's coherent prime hash, in uint32 like tcnn) and writes the trilinear mix of their
  features, `[N, levels * F]`, level-major;
* backward: the same walk, adding `weight * grad_out` into the touched table rows with fp32
  atomic adds (what tcnn does too), and, when the points need it, d/dx.

Triton ships with PyTorch's Linux CUDA wheels, so every `pip install` user on an NVIDIA GPU
gets it. On the CPU it runs only under Triton's interpreter (`TRITON_INTERPRET=1`, set before
this module is imported), which the tests use to check it against the torch backend.
Atomic adds in a different order give float results that can differ in the last bits from
run to run, as tcnn's do.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

import triton
import triton.language as tl

from engine.errors import DeviceError
from engine.fields.hashgrid import HASH_PRIMES, TRITON_INSTALL_FIX, HashGridEncoding

BLOCK_POINTS = 128  # points per program (4 warps)

# Triton decides at decoration time (below) whether kernels compile for the GPU or run in its CPU
# interpreter, so what counts is TRITON_INTERPRET when this module was imported.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


@triton.jit
def _level_rows_and_weights(x0, x1, x2, scale, mx, my, mz, size, hashed):
    """Per-axis corner terms (uint32) and interpolation fractions of one level (helper, inlined)."""
    p0 = tl.fma(x0, scale, 0.5)
    p1 = tl.fma(x1, scale, 0.5)
    p2 = tl.fma(x2, scale, 0.5)
    f0 = tl.floor(p0)
    f1 = tl.floor(p1)
    f2 = tl.floor(p2)
    # float -> int32 -> same bits as uint32: negative corners (points outside [0,1]) wrap like tcnn's uint32.
    c0 = f0.to(tl.int32).to(tl.uint32, bitcast=True)
    c1 = f1.to(tl.int32).to(tl.uint32, bitcast=True)
    c2 = f2.to(tl.int32).to(tl.uint32, bitcast=True)
    return c0 * mx, c1 * my, c2 * mz, p0 - f0, p1 - f1, p2 - f2


@triton.jit
def _corner_row(t0, t1, t2, mx, my, mz, bx: tl.constexpr, by: tl.constexpr, bz: tl.constexpr, size, hashed,
                offset):
    """Global table row of the corner with offset bits (bx, by, bz): (c + b) * m = c * m + b * m mod 2^32."""
    if bx:
        t0 = t0 + mx
    if by:
        t1 = t1 + my
    if bz:
        t2 = t2 + mz
    index = tl.where(hashed != 0, t0 ^ t1 ^ t2, t0 + t1 + t2) % size
    return offset + index.to(tl.int64)


@triton.jit
def _corner_weight(w0, w1, w2, bx: tl.constexpr, by: tl.constexpr, bz: tl.constexpr):
    if bx:
        a = w0
    else:
        a = 1.0 - w0
    if by:
        b = w1
    else:
        b = 1.0 - w1
    if bz:
        c = w2
    else:
        c = 1.0 - w2
    return a, b, c


@triton.jit
def _hash_grid_forward(x_ptr, params_ptr, out_ptr, scale_ptr, mult_ptr, size_ptr, hashed_ptr, offset_ptr,
                       n_points, n_levels, F: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    points = pid * BLOCK + tl.arange(0, BLOCK)
    live = points < n_points
    points64 = points.to(tl.int64)
    x0 = tl.load(x_ptr + points64 * 3 + 0, mask=live, other=0.0)
    x1 = tl.load(x_ptr + points64 * 3 + 1, mask=live, other=0.0)
    x2 = tl.load(x_ptr + points64 * 3 + 2, mask=live, other=0.0)
    features = tl.arange(0, F)
    live2 = live[:, None] & (features[None, :] < F)
    out_row = points64[:, None] * (n_levels * F) + features[None, :]
    for level in range(n_levels):
        scale = tl.load(scale_ptr + level)
        mx = tl.load(mult_ptr + level * 3 + 0).to(tl.uint32, bitcast=True)
        my = tl.load(mult_ptr + level * 3 + 1).to(tl.uint32, bitcast=True)
        mz = tl.load(mult_ptr + level * 3 + 2).to(tl.uint32, bitcast=True)
        size = tl.load(size_ptr + level).to(tl.uint32, bitcast=True)
        hashed = tl.load(hashed_ptr + level)
        offset = tl.load(offset_ptr + level)
        t0, t1, t2, w0, w1, w2 = _level_rows_and_weights(x0, x1, x2, scale, mx, my, mz, size, hashed)
        acc = tl.zeros((BLOCK, F), dtype=tl.float32)
        for k in tl.static_range(8):
            row = _corner_row(t0, t1, t2, mx, my, mz, k & 1, (k >> 1) & 1, (k >> 2) & 1, size, hashed, offset)
            a, b, c = _corner_weight(w0, w1, w2, k & 1, (k >> 1) & 1, (k >> 2) & 1)
            weight = (c * b) * a  # same order as the torch backend's corner products
            values = tl.load(params_ptr + row[:, None] * F + features[None, :], mask=live2, other=0.0)
            acc += weight[:, None] * values
        tl.store(out_ptr + out_row + level * F, acc, mask=live2)


@triton.jit
def _hash_grid_backward(x_ptr, params_ptr, grad_out_ptr, grad_params_ptr, grad_x_ptr, scale_ptr, mult_ptr,
                        size_ptr, hashed_ptr, offset_ptr, n_points, n_levels, F: tl.constexpr,
                        BLOCK: tl.constexpr, NEED_GRAD_X: tl.constexpr):
    pid = tl.program_id(0)
    points = pid * BLOCK + tl.arange(0, BLOCK)
    live = points < n_points
    points64 = points.to(tl.int64)
    x0 = tl.load(x_ptr + points64 * 3 + 0, mask=live, other=0.0)
    x1 = tl.load(x_ptr + points64 * 3 + 1, mask=live, other=0.0)
    x2 = tl.load(x_ptr + points64 * 3 + 2, mask=live, other=0.0)
    features = tl.arange(0, F)
    live2 = live[:, None] & (features[None, :] < F)
    out_row = points64[:, None] * (n_levels * F) + features[None, :]
    gx0 = tl.zeros((BLOCK,), dtype=tl.float32)
    gx1 = tl.zeros((BLOCK,), dtype=tl.float32)
    gx2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for level in range(n_levels):
        scale = tl.load(scale_ptr + level)
        mx = tl.load(mult_ptr + level * 3 + 0).to(tl.uint32, bitcast=True)
        my = tl.load(mult_ptr + level * 3 + 1).to(tl.uint32, bitcast=True)
        mz = tl.load(mult_ptr + level * 3 + 2).to(tl.uint32, bitcast=True)
        size = tl.load(size_ptr + level).to(tl.uint32, bitcast=True)
        hashed = tl.load(hashed_ptr + level)
        offset = tl.load(offset_ptr + level)
        grad = tl.load(grad_out_ptr + out_row + level * F, mask=live2, other=0.0)
        t0, t1, t2, w0, w1, w2 = _level_rows_and_weights(x0, x1, x2, scale, mx, my, mz, size, hashed)
        d0 = tl.zeros((BLOCK,), dtype=tl.float32)
        d1 = tl.zeros((BLOCK,), dtype=tl.float32)
        d2 = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(8):
            row = _corner_row(t0, t1, t2, mx, my, mz, k & 1, (k >> 1) & 1, (k >> 2) & 1, size, hashed, offset)
            a, b, c = _corner_weight(w0, w1, w2, k & 1, (k >> 1) & 1, (k >> 2) & 1)
            weight = (c * b) * a
            address = row[:, None] * F + features[None, :]
            tl.atomic_add(grad_params_ptr + address, weight[:, None] * grad, mask=live2, sem="relaxed")
            if NEED_GRAD_X:
                values = tl.load(params_ptr + address, mask=live2, other=0.0)
                dot = tl.sum(values * grad, axis=1)
                # d weight / d frac_d: the other two axes' factors, signed by this corner's bit
                if k & 1:
                    d0 += dot * (b * c)
                else:
                    d0 -= dot * (b * c)
                if (k >> 1) & 1:
                    d1 += dot * (a * c)
                else:
                    d1 -= dot * (a * c)
                if (k >> 2) & 1:
                    d2 += dot * (a * b)
                else:
                    d2 -= dot * (a * b)
        if NEED_GRAD_X:
            gx0 += d0 * scale  # d frac / d x = scale, as in tcnn and the torch backend
            gx1 += d1 * scale
            gx2 += d2 * scale
    if NEED_GRAD_X:
        tl.store(grad_x_ptr + points64 * 3 + 0, gx0, mask=live)
        tl.store(grad_x_ptr + points64 * 3 + 1, gx1, mask=live)
        tl.store(grad_x_ptr + points64 * 3 + 2, gx2, mask=live)


class _LevelTables:
    """The per-level constants the kernels read, as device tensors (built once per device)."""

    def __init__(self, grid: HashGridEncoding, device: torch.device):
        multipliers = [HASH_PRIMES if hashed else (1, res, res * res)
                       for hashed, res in zip(grid.hashed, grid.resolutions)]
        # uint32 bit patterns stored as int32 (torch has no uint32 arithmetic); the kernels bitcast them back.
        as_int32 = [[m - (1 << 32) if m >= (1 << 31) else m for m in row] for row in multipliers]
        self.scale = torch.tensor(grid.scales, dtype=torch.float32, device=device)
        self.multiplier = torch.tensor(as_int32, dtype=torch.int32, device=device).reshape(-1)
        self.size = torch.tensor(grid.sizes, dtype=torch.int32, device=device)
        self.hashed = torch.tensor([int(h) for h in grid.hashed], dtype=torch.int32, device=device)
        self.offset = torch.tensor(grid.offsets, dtype=torch.int64, device=device)

    def args(self):
        return self.scale, self.multiplier, self.size, self.hashed, self.offset


def _on_device_of(x: Tensor):
    """Triton launches on the current CUDA device and its stream: make that x's (`--device cuda:1`), so the
    kernel does not run on GPU 0 with another GPU's pointers. A no-op on the CPU (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _HashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, tables: _LevelTables, n_levels: int, n_features: int) -> Tensor:
        n_points = x.shape[0]
        out = torch.empty(n_points, n_levels * n_features, device=x.device, dtype=torch.float32)
        if n_points:
            grid = (triton.cdiv(n_points, BLOCK_POINTS),)
            with _on_device_of(x):
                _hash_grid_forward[grid](x, params, out, *tables.args(), n_points, n_levels,
                                         F=n_features, BLOCK=BLOCK_POINTS)
        ctx.save_for_backward(x, params)
        ctx.tables, ctx.n_levels, ctx.n_features = tables, n_levels, n_features
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, params = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_params = torch.zeros_like(params)
        # without an input gradient the kernel never touches grad_x; any valid device pointer will do
        # (an empty tensor's null pointer is refused by Triton's launcher on CUDA)
        grad_x = torch.empty_like(x) if need_x else grad_params
        n_points = x.shape[0]
        if n_points and (need_x or need_params):
            grid = (triton.cdiv(n_points, BLOCK_POINTS),)
            with _on_device_of(x):
                _hash_grid_backward[grid](x, params, grad_out.float().contiguous(), grad_params, grad_x,
                                          *ctx.tables.args(), n_points, ctx.n_levels, F=ctx.n_features,
                                          BLOCK=BLOCK_POINTS, NEED_GRAD_X=bool(need_x))
        return (grad_x if need_x else None), (grad_params if need_params else None), None, None, None


class TritonHashGridEncoding(HashGridEncoding):
    """HashGridEncoding whose forward and backward are fused Triton kernels (same params, same outputs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.n_features_per_level & (self.n_features_per_level - 1):
            raise ValueError(f"the Triton hash grid needs a power-of-two n_features_per_level (tcnn: 1, 2, 4 or 8), "
                             f"got {self.n_features_per_level}")
        self._tables: dict[torch.device, _LevelTables] = {}

    def _level_tables(self, device: torch.device) -> _LevelTables:
        if device not in self._tables:
            self._tables[device] = _LevelTables(self, device)
        return self._tables[device]

    def forward(self, x: Tensor) -> Tensor:
        """[..., 3] points in [0,1] -> [..., n_levels * F] features, level-major (as HashGridEncoding)."""
        if not self.params.is_cuda and not _INTERPRETED:
            raise DeviceError("The Triton hash grid runs on CUDA GPUs only; this one is on the "
                              f"{self.params.device.type}.", TRITON_INSTALL_FIX)
        lead_shape = x.shape[:-1]
        x = x.reshape(-1, 3).to(device=self.params.device, dtype=torch.float32).contiguous()
        tables = self._level_tables(self.params.device)
        features = _HashGridFunction.apply(x, self.params, tables, self.n_levels, self.n_features_per_level)
        return features.reshape(*lead_shape, self.output_dim)
