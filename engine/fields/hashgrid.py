"""InstantNGP multi-resolution hash-grid encoding (3-D input).

`HashGridEncoding` is a pure-PyTorch re-implementation of tiny-cuda-nn's `HashGrid`
encoding with the *same parameter layout and the same math*, so that parameters can be
copied between it and `tinycudann.Encoding` in either direction (checkpoints trained on a
CUDA machine with tcnn load on a CPU machine and vice versa). The reference is
NVlabs/tiny-cuda-nn, `include/tiny-cuda-nn/encodings/grid.h` (offset table, kernel_grid,
initialize_params) and `include/tiny-cuda-nn/common_device.h` (grid_scale,
grid_resolution, pos_fract, grid_index, coherent_prime_hash).

Layout (what tcnn does, and therefore what we do):

* level l has `scale_l = exp2(l * log2(per_level_scale)) * base_resolution - 1` and
  `resolution_l = ceil(scale_l) + 1`, all in float32 arithmetic;
* level l owns `size_l = min(next_multiple(resolution_l**3, 8), 2**log2_hashmap_size)`
  table entries, stored one level after the other; feature f of entry i of level l is
  `params[(offset_l + i) * F + f]`;
* a point x in [0,1]^3 is mapped to `pos = fma(x, scale_l, 0.5)`; its cell corner is
  `floor(pos)` and it is trilinearly interpolated from the 8 corners of that cell;
* a corner's entry is its dense row-major index when the level's table can hold the whole
  grid, else the xor of `corner[d] * prime[d]` (uint32 wrap-around); either way modulo
  `size_l`.

`TcnnHashGridEncoding` wraps `tinycudann.Encoding` behind the same interface,
`TritonHashGridEncoding` (hashgrid_triton.py) runs this module's math as fused Triton kernels,
and `make_hash_grid` picks one: tcnn, else Triton on CUDA, else this pure-PyTorch version.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import DeviceError

# tcnn's `coherent_prime_hash` factors for x, y, z (the first is 1 so that neighbouring
# cells along x land in neighbouring table rows, which is cache friendly on the GPU).
HASH_PRIMES = (1, 2654435761, 805459861)

# tcnn's `grid_index` stops computing dense strides above this resolution (3-D), to keep
# `resolution**3` inside uint32; such levels are always hashed.
MAX_DENSE_RESOLUTION_3D = 0x659

_UINT32_MASK = 0xFFFFFFFF

TCNN_INSTALL_FIX = (
    "Build tiny-cuda-nn's PyTorch bindings from source on a machine with CUDA and a CUDA "
    "toolkit: `pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch`, "
    "or use backend 'torch' (pure PyTorch, same parameters, slower)."
)


# ----------------------------------------------------------------------------- config


def per_level_scale(n_levels: int, base_resolution: int, finest_resolution: int) -> float:
    """Growth factor b between levels so that level L-1 has `finest_resolution`."""
    if n_levels <= 1:
        return 1.0
    return math.exp((math.log(finest_resolution) - math.log(base_resolution)) / (n_levels - 1))


def hash_grid_config(
    n_levels: int = 16,
    n_features_per_level: int = 2,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    finest_resolution: int = 2048,
) -> dict:
    """The tiny-cuda-nn `encoding_config` of this hash grid."""
    return {
        "otype": "HashGrid",
        "n_levels": int(n_levels),
        "n_features_per_level": int(n_features_per_level),
        "log2_hashmap_size": int(log2_hashmap_size),
        "base_resolution": int(base_resolution),
        "per_level_scale": per_level_scale(n_levels, base_resolution, finest_resolution),
    }


def level_scales(n_levels: int, base_resolution: int, per_level_scale_: float) -> list[float]:
    """tcnn's `grid_scale` per level, evaluated in float32 like tcnn does.

    tcnn reads per_level_scale from the JSON config as a float, takes `std::log2` of it in
    float and computes `exp2f(level * log2_scale) * base - 1.0f`. We round every step to
    float32; log2 and exp2 are taken in float64 and rounded once, i.e. correctly rounded
    like glibc's log2f/exp2f (numpy's float32 exp2 can be 1 ulp off).
    """
    log2_scale = _f32(math.log2(_f32(per_level_scale_)))
    scales = []
    for level in range(n_levels):
        growth = _f32(math.exp2(_f32(level * log2_scale)))
        scales.append(_f32(_f32(growth * base_resolution) - 1.0))
    return scales


def _f32(value: float) -> float:
    """Round to the nearest float32 (and back to a Python float)."""
    return float(np.float32(value))


def level_resolution(scale: float) -> int:
    """tcnn's `grid_resolution`: vertices per axis (the +1 is the 0.5 offset's spill-over)."""
    return math.ceil(scale) + 1


def level_size(resolution: int, log2_hashmap_size: int) -> int:
    """Table entries of one level, as in tcnn's GridEncodingTemplated constructor."""
    max_params = _UINT32_MASK // 2
    dense = max_params if float(resolution) ** 3 > max_params else resolution**3
    dense = (dense + 7) // 8 * 8  # next_multiple(.., 8): aligned memory accesses
    return min(dense, 1 << log2_hashmap_size)


def level_is_hashed(resolution: int, size: int) -> bool:
    """tcnn's `grid_index` hashes when the table is smaller than the dense grid."""
    if resolution > MAX_DENSE_RESOLUTION_3D:
        return True
    return size < resolution**3


# ----------------------------------------------------------------------------- torch


class HashGridEncoding(nn.Module):
    """Pure-PyTorch hash grid with tiny-cuda-nn's exact layout and math."""

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        finest_resolution: int = 2048,
    ):
        super().__init__()
        if not 1 <= log2_hashmap_size <= 31:
            raise ValueError(f"log2_hashmap_size must be in [1, 31], got {log2_hashmap_size}")
        self.n_levels = int(n_levels)
        self.n_features_per_level = int(n_features_per_level)
        self.output_dim = self.n_levels * self.n_features_per_level
        self.log2_hashmap_size = int(log2_hashmap_size)
        self.base_resolution = int(base_resolution)
        self.finest_resolution = int(finest_resolution)
        self.config = hash_grid_config(
            n_levels, n_features_per_level, log2_hashmap_size, base_resolution, finest_resolution
        )

        # Per-level tables, computed once in Python exactly like tcnn's host code.
        self.scales = level_scales(self.n_levels, self.base_resolution, self.config["per_level_scale"])
        self.resolutions = [level_resolution(s) for s in self.scales]
        self.sizes = [level_size(r, self.log2_hashmap_size) for r in self.resolutions]
        self.hashed = [level_is_hashed(r, s) for r, s in zip(self.resolutions, self.sizes)]
        self.offsets = [sum(self.sizes[:level]) for level in range(self.n_levels)]
        self.n_entries = sum(self.sizes)

        # Levels are processed in runs of the same kind (usually: dense levels, then hashed
        # ones), so each run is one batch of tensor ops over [N, levels_in_run, ...].
        self._runs = _runs_of_same_kind(self.hashed)

        # scale as float64: forward emulates tcnn's single-rounding fmaf(scale, x, 0.5f).
        self.register_buffer("_scale", torch.tensor(self.scales, dtype=torch.float64), persistent=False)
        self.register_buffer("_offset", torch.tensor(self.offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("_size", torch.tensor(self.sizes, dtype=torch.int64), persistent=False)
        # Per-axis multipliers: dense strides (1, res, res^2) or the hash primes.
        multipliers = [
            HASH_PRIMES if hashed else (1, res, res * res) for hashed, res in zip(self.hashed, self.resolutions)
        ]
        self.register_buffer("_multiplier", torch.tensor(multipliers, dtype=torch.int64), persistent=False)
        self.register_buffer("_corner_bit", torch.tensor([0, 1], dtype=torch.int64), persistent=False)

        # tcnn's initialize_params: uniform in [-1e-4, 1e-4].
        params = torch.empty(self.n_entries * self.n_features_per_level, dtype=torch.float32)
        self.params = nn.Parameter(params.uniform_(-1e-4, 1e-4))

    def extra_repr(self) -> str:
        n_hashed = sum(self.hashed)
        return (
            f"n_levels={self.n_levels}, n_features_per_level={self.n_features_per_level}, "
            f"log2_hashmap_size={self.log2_hashmap_size}, base_resolution={self.base_resolution}, "
            f"finest_resolution={self.finest_resolution}, dense_levels={self.n_levels - n_hashed}, "
            f"hashed_levels={n_hashed}, n_params={self.params.numel()}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """[..., 3] points in [0,1] -> [..., n_levels * F] features, level-major."""
        lead_shape = x.shape[:-1]
        x = x.reshape(-1, 3).to(device=self.params.device, dtype=torch.float32)

        corner, frac = self._cells(x)  # [N, L, 3] int64, [N, L, 3] float32
        rows = self._corner_rows(corner)  # [N, L, 8] rows of params.view(-1, F)
        weights = _trilinear_weights(frac)  # [N, L, 8]

        table = self.params.view(-1, self.n_features_per_level)
        values = _GatherRows.apply(table, rows.reshape(-1)).view(*rows.shape, self.n_features_per_level)
        features = torch.einsum("nlk,nlkf->nlf", weights, values)  # bmm: faster than mul+sum
        return features.reshape(*lead_shape, self.output_dim)

    def _cells(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cell corner (integer) and position inside the cell for every point and level.

        tcnn computes `pos = fmaf(scale, x, 0.5f)` with one float32 rounding. The product of
        two float32 values is exact in float64, so rounding the float64 result once to
        float32 reproduces the fma bit-for-bit (up to vanishingly rare double-rounding ties).
        """
        pos = (x.double().unsqueeze(1) * self._scale.view(1, -1, 1) + 0.5).float()  # [N, L, 3]
        cell = torch.floor(pos)
        frac = pos - cell.detach()  # exact in float32; d(frac)/dx = scale, as in tcnn
        return cell.long(), frac

    def _corner_rows(self, corner: Tensor) -> Tensor:
        """Global table row of each of the 8 cell corners, [N, L, 8] int64.

        Corner k has offset bit (k >> d) & 1 along axis d (tcnn's enumeration). Both the
        dense index and the hash are combinations of one term per axis, so we compute the
        two possible terms per axis ([N, L, 3, 2]) and combine them by broadcasting.
        """
        per_run = []
        for start, stop, hashed in self._runs:
            terms = (corner[:, start:stop, :, None] + self._corner_bit) * self._multiplier[start:stop, :, None]
            if hashed:
                # Hashed tables have 2**log2_hashmap_size entries, so `% size` of the uint32
                # xor is its low bits; low bits of products and xors do not depend on high
                # bits, so we mask each term first and finish in int32 (half the memory
                # traffic of int64 on the [N, L, 8] tensors).
                terms = (terms & ((1 << self.log2_hashmap_size) - 1)).int()
                index = _combine_corners(terms, torch.bitwise_xor)
            else:
                # uint32 wrap-around first (matters only for points outside [0,1]), then the
                # modulo that makes the +0.5 spill-over wrap inside a dense level.
                index = (_combine_corners(terms, torch.add) & _UINT32_MASK) % self._size[start:stop].view(1, -1, 1)
            per_run.append(index + self._offset[start:stop].view(1, -1, 1))  # int64 again
        return per_run[0] if len(per_run) == 1 else torch.cat(per_run, dim=1)


class _GatherRows(torch.autograd.Function):
    """`table[rows]` whose backward adds the output gradient into the touched rows only.

    Same result as `table.index_select(0, rows)`; the forward moves each row as one
    8-byte word when it is 8 bytes long (2 float32 features, the usual case), which
    halves the gather time on CPU.
    """

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.n_rows = table.shape[0]
        if table.shape[1] * table.element_size() == 8 and table.is_contiguous():
            words = table.view(torch.int64).view(-1)  # reinterprets bits, no float math
            return words.index_select(0, rows).view(table.dtype).view(-1, table.shape[1])
        return table.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        (rows,) = ctx.saved_tensors
        grad_table = grad_values.new_zeros(ctx.n_rows, grad_values.shape[1])
        return grad_table.index_add_(0, rows, grad_values), None


def _runs_of_same_kind(hashed: list[bool]) -> list[tuple[int, int, bool]]:
    """[(start, stop, hashed)] for maximal runs of consecutive levels of the same kind."""
    runs: list[tuple[int, int, bool]] = []
    for level, kind in enumerate(hashed):
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], level + 1, kind)
        else:
            runs.append((level, level + 1, kind))
    return runs


def _combine_corners(terms: Tensor, op) -> Tensor:
    """[N, L, 3, 2] per-axis terms -> [N, L, 8] with corner k = x_bit + 2 y_bit + 4 z_bit."""
    x, y, z = terms.unbind(dim=2)
    combined = op(op(z[:, :, :, None, None], y[:, :, None, :, None]), x[:, :, None, None, :])
    return combined.reshape(*terms.shape[:2], 8)


def _trilinear_weights(frac: Tensor) -> Tensor:
    """[N, L, 3] position in the cell -> [N, L, 8] weights, same corner order as the rows."""
    per_axis = torch.stack((1.0 - frac, frac), dim=-1)  # [N, L, 3, 2]
    return _combine_corners(per_axis, torch.mul)


# ----------------------------------------------------------------------------- tcnn


def tcnn_available() -> bool:
    """True when tinycudann imports and CUDA is usable."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or a binding built for another CUDA/torch
        return False
    return True


class TcnnHashGridEncoding(nn.Module):
    """tinycudann.Encoding behind HashGridEncoding's interface (float32 output).

    `dtype` is the precision of tcnn's parameters and computation: None lets tcnn pick
    (half on most GPUs, fastest), torch.float32 matches HashGridEncoding to rounding.
    """

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        finest_resolution: int = 2048,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not tcnn_available():
            raise DeviceError("tiny-cuda-nn (tinycudann) with CUDA is not available.", TCNN_INSTALL_FIX)
        import tinycudann

        self.n_levels = int(n_levels)
        self.n_features_per_level = int(n_features_per_level)
        self.output_dim = self.n_levels * self.n_features_per_level
        self.config = hash_grid_config(
            n_levels, n_features_per_level, log2_hashmap_size, base_resolution, finest_resolution
        )
        encoding = tinycudann.Encoding(n_input_dims=3, encoding_config=self.config, dtype=dtype)
        # Keep tcnn's module out of the submodules and register its Parameter object here as
        # `params`, so the state_dict is {"params": ...} for both backends: checkpoints move
        # between tcnn and HashGridEncoding unchanged. tcnn's forward reads the same object.
        object.__setattr__(self, "encoding", encoding)
        self.params = encoding.params

    def forward(self, x: Tensor) -> Tensor:
        lead_shape = x.shape[:-1]
        features = self.encoding(x.reshape(-1, 3))
        return features.float().reshape(*lead_shape, self.output_dim)


# ----------------------------------------------------------------------------- triton

TRITON_INSTALL_FIX = (
    "Triton comes with PyTorch's Linux CUDA wheels (`pip install torch`); elsewhere `pip install triton`, "
    "or use backend 'torch' (pure PyTorch, same parameters, slower)."
)


def triton_available() -> bool:
    """True when Triton imports and CUDA is usable (its kernels run on NVIDIA GPUs)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _triton_usable() -> bool:
    """CUDA with Triton, or Triton's CPU interpreter (TRITON_INTERPRET=1: tests)."""
    try:
        from engine.fields.hashgrid_triton import interpreting
    except Exception:
        return False
    return interpreting() or triton_available()


# ----------------------------------------------------------------------------- factory

BACKENDS = ("auto", "tcnn", "triton", "torch")


def auto_backend() -> str:
    """Triton on CUDA, else tinycudann, else PyTorch. Triton first: on one H200 a whole fit step took
    59.0 ms with it against 74.1 with tinycudann at `paper`, 66.1 against 73.0 at `standard` (64.3 against
    67.1 at `fast`; bench/results/steps_sd15_nvidia-h200_s26a.json), and it computes what the PyTorch grid
    computes to 3e-7 (tinycudann, in half precision, to 2e-4). Only on GPUs Triton supports (compute
    capability 8.0 and up, by its own README); on older ones tinycudann, which builds for them."""
    triton_ok = triton_available() and torch.cuda.get_device_capability() >= (8, 0)
    return "triton" if triton_ok else "tcnn" if tcnn_available() else "torch"


def make_hash_grid(
    n_levels: int = 16,
    n_features_per_level: int = 2,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    finest_resolution: int = 2048,
    backend: str = "auto",
) -> nn.Module:
    """A hash grid on `backend`: "tcnn", "triton", "torch", or "auto" (`auto_backend`). All three share
    parameters, outputs and state_dict."""
    args = (n_levels, n_features_per_level, log2_hashmap_size, base_resolution, finest_resolution)
    if backend == "auto":
        backend = auto_backend()
    if backend == "torch":
        return HashGridEncoding(*args)
    if backend == "tcnn":
        return TcnnHashGridEncoding(*args)
    if backend == "triton":
        if not _triton_usable():
            raise DeviceError("The Triton hash grid needs Triton and a CUDA GPU.", TRITON_INSTALL_FIX)
        from engine.fields.hashgrid_triton import TritonHashGridEncoding

        return TritonHashGridEncoding(*args)
    raise ValueError(f"unknown hash grid backend {backend!r}; use one of {', '.join(BACKENDS)}")
