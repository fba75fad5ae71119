"""HashGridEncoding reproduces tiny-cuda-nn's HashGrid layout and math.

The reference below is written out point by point, level by level and corner by corner
with Python ints (uint32 arithmetic made explicit) and floats, following tiny-cuda-nn's
grid.h / common_device.h. Where tcnn rounds to float32 the reference rounds too (`f32`).
"""

import math
import struct
import sys
import types

import pytest
import torch

from engine.errors import DeviceError
from engine.fields.hashgrid import (
    HashGridEncoding,
    hash_grid_config,
    make_hash_grid,
    tcnn_available,
)

# Small config with both kinds of level: resolutions 4, 7 | 13, 22, 37, 64, so levels 0-1
# fit their table (dense index) and levels 2-5 are hashed into 2**10 entries.
SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, finest_resolution=64)
PRIMES = (1, 2654435761, 805459861)


def f32(value: float) -> float:
    """Round a Python float to the nearest float32, as tcnn's float arithmetic does."""
    return struct.unpack("f", struct.pack("f", value))[0]


def reference_levels(n_levels, log2_hashmap_size, base_resolution, finest_resolution):
    """[(scale, resolution, hashmap_size, offset)] per level, as tcnn's host code builds it."""
    b = math.exp((math.log(finest_resolution) - math.log(base_resolution)) / (n_levels - 1))
    log2_b = f32(math.log2(f32(b)))
    levels, offset = [], 0
    for level in range(n_levels):
        scale = f32(f32(f32(2.0 ** f32(level * log2_b)) * base_resolution) - 1.0)  # grid_scale
        resolution = math.ceil(scale) + 1  # grid_resolution
        size = min((resolution**3 + 7) // 8 * 8, 2**log2_hashmap_size)  # next_multiple(., 8)
        levels.append((scale, resolution, size, offset))
        offset += size
    return levels


def reference_grid_index(corner, resolution, hashmap_size):
    """tcnn's grid_index for 3-D, on Python ints."""
    stride, index = 1, 0
    for d in range(3):
        index = (index + corner[d] * stride) & 0xFFFFFFFF
        stride *= resolution
    if hashmap_size < stride:  # the table cannot hold the dense grid: coherent prime hash
        index = 0
        for d in range(3):
            index ^= (corner[d] * PRIMES[d]) & 0xFFFFFFFF
    return index % hashmap_size


def reference_encode(point, params, config):
    """Features of one point: for each level, trilinear interpolation of the 8 corners."""
    n_features = config["n_features_per_level"]
    features = []
    for scale, resolution, size, offset in reference_levels(
        config["n_levels"], config["log2_hashmap_size"], config["base_resolution"], config["finest_resolution"]
    ):
        pos = [f32(scale * f32(x) + 0.5) for x in point]  # fmaf(scale, x, 0.5f): one rounding
        cell = [math.floor(p) for p in pos]
        frac = [p - c for p, c in zip(pos, cell)]
        level_features = [0.0] * n_features
        for k in range(8):
            bits = [(k >> d) & 1 for d in range(3)]
            weight = 1.0
            for d in range(3):
                weight *= frac[d] if bits[d] else 1.0 - frac[d]
            corner = [cell[d] + bits[d] for d in range(3)]
            entry = offset + reference_grid_index(corner, resolution, size)
            for f in range(n_features):
                level_features[f] += weight * params[entry * n_features + f]
        features.extend(level_features)
    return features


def touched_entries(point, config):
    """{global entry: summed interpolation weight} of one point, over all levels."""
    touched = {}
    for scale, resolution, size, offset in reference_levels(
        config["n_levels"], config["log2_hashmap_size"], config["base_resolution"], config["finest_resolution"]
    ):
        pos = [f32(scale * f32(x) + 0.5) for x in point]
        cell = [math.floor(p) for p in pos]
        for k in range(8):
            bits = [(k >> d) & 1 for d in range(3)]
            weight = math.prod(p - c if b else 1.0 - (p - c) for p, c, b in zip(pos, cell, bits))
            entry = offset + reference_grid_index([c + b for c, b in zip(cell, bits)], resolution, size)
            touched[entry] = touched.get(entry, 0.0) + weight
    return touched


@pytest.fixture
def small_grid():
    torch.manual_seed(0)
    grid = HashGridEncoding(**SMALL)
    with torch.no_grad():  # O(1) params so that interpolation errors would show
        grid.params.uniform_(-1.0, 1.0)
    return grid


def test_matches_reference_on_random_points(small_grid):
    points = torch.rand(200, 3)
    out = small_grid(points)
    params = small_grid.params.detach().double().tolist()
    expected = torch.tensor([reference_encode(p, params, SMALL) for p in points.tolist()], dtype=torch.float64)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=0)


def test_small_config_has_dense_and_hashed_levels(small_grid):
    assert small_grid.resolutions == [4, 7, 13, 22, 37, 64]
    assert small_grid.hashed == [False, False, True, True, True, True]


def test_param_count_is_sum_of_level_sizes(small_grid):
    # dense 4^3 = 64, dense 7^3 = 343 -> 344 (multiple of 8), then 4 hashed levels of 2^10;
    # times 2 features.
    assert small_grid.params.numel() == (64 + 344 + 4 * 1024) * 2 == 9008
    assert small_grid.params.dtype == torch.float32 and small_grid.params.dim() == 1


def test_param_count_of_default_config():
    # Resolutions 16, 23, 31, 43, 59 fit 2^19 entries (16^3, 23^3=12167->12168, 31^3=29791->
    # 29792, 43^3=79507->79512, 59^3=205379->205384); the 11 levels from 81 up are hashed.
    grid = HashGridEncoding()
    dense = 4096 + 12168 + 29792 + 79512 + 205384
    assert grid.params.numel() == (dense + 11 * 2**19) * 2 == 12196240
    assert grid.output_dim == 32


def test_params_initialised_like_tcnn(small_grid):
    grid = HashGridEncoding(**SMALL)
    assert grid.params.abs().max() <= 1e-4
    assert grid.params.std() > 1e-5  # uniform in [-1e-4, 1e-4], not all zero


def test_gradients_reach_only_touched_entries(small_grid):
    point = [0.3141, 0.5926, 0.5358]
    small_grid(torch.tensor([point])).sum().backward()
    grad = small_grid.params.grad.view(-1, 2)

    touched = touched_entries(point, SMALL)
    expected = torch.zeros_like(grad, dtype=torch.float64)
    for entry, weight in touched.items():
        expected[entry] = weight  # d(sum of features)/d(param) = its interpolation weight
    assert set(grad.abs().sum(1).nonzero().flatten().tolist()) == {e for e, w in touched.items() if w != 0}
    assert torch.allclose(grad.double(), expected, atol=1e-6, rtol=0)


def test_output_shape_dtype_and_layout(small_grid):
    out = small_grid(torch.rand(5, 3, dtype=torch.float64))
    assert out.shape == (5, 12) and out.dtype == torch.float32
    assert small_grid(torch.rand(2, 7, 3)).shape == (2, 7, 12)  # leading dims are kept
    assert small_grid(torch.rand(0, 3)).shape == (0, 12)


def test_layout_is_level_major(small_grid):
    point = torch.rand(1, 3)
    with torch.no_grad():
        small_grid.params.zero_()
        level, offset = 2, small_grid.offsets[2]
        small_grid.params.view(-1, 2)[offset : offset + small_grid.sizes[level], 1] = 1.0
    out = small_grid(point)[0]
    # every corner of level 2 reads feature 1 == 1, so output column 2*2+1 is exactly 1
    assert out.tolist() == pytest.approx([0.0] * 5 + [1.0] + [0.0] * 6, abs=1e-6)


def test_corners_of_the_unit_cube_stay_in_range(small_grid):
    corners = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.float32)
    rows = small_grid._corner_rows(small_grid._cells(corners)[0])
    assert rows.min() >= 0 and rows.max() < small_grid.n_entries
    params = small_grid.params.detach().double().tolist()
    expected = torch.tensor([reference_encode(p, params, SMALL) for p in corners.tolist()], dtype=torch.float64)
    assert torch.allclose(small_grid(corners).double(), expected, atol=1e-5, rtol=0)


def test_points_slightly_outside_wrap_like_tcnn(small_grid):
    # tcnn casts floor(pos) to uint32, so a corner at -1 is 2**32 - 1 (wrap-around).
    points = torch.rand(50, 3) * 1.2 - 0.1
    params = small_grid.params.detach().double().tolist()
    expected = torch.tensor([reference_encode(p, params, SMALL) for p in points.tolist()], dtype=torch.float64)
    assert torch.allclose(small_grid(points).double(), expected, atol=1e-5, rtol=0)


def test_input_gradient_is_finite(small_grid):
    points = torch.rand(16, 3, requires_grad=True)
    small_grid(points).square().sum().backward()
    assert points.grad is not None and torch.isfinite(points.grad).all()


def test_config_matches_tcnn_schema():
    config = hash_grid_config(16, 2, 19, 16, 2048)
    assert config == {
        "otype": "HashGrid",
        "n_levels": 16,
        "n_features_per_level": 2,
        "log2_hashmap_size": 19,
        "base_resolution": 16,
        "per_level_scale": pytest.approx(2 ** (7 / 15)),  # (2048 / 16) ** (1 / 15)
    }


@pytest.mark.skipif(tcnn_available(), reason="this machine has tinycudann and CUDA")
def test_backend_selection_without_tcnn():
    assert isinstance(make_hash_grid(**SMALL, backend="auto"), HashGridEncoding)
    assert isinstance(make_hash_grid(**SMALL, backend="torch"), HashGridEncoding)
    with pytest.raises(DeviceError) as info:
        make_hash_grid(**SMALL, backend="tcnn")
    assert "tiny-cuda-nn" in info.value.fix and "backend 'torch'" in info.value.fix
    assert info.value.fix in str(info.value)
    with pytest.raises(ValueError):
        make_hash_grid(**SMALL, backend="cuda")


class _FakeTcnnEncoding(torch.nn.Module):
    """Stands in for tinycudann.Encoding: a half-precision output and its own `params`."""

    def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):
        super().__init__()
        config = dict(encoding_config)
        self.grid = HashGridEncoding(
            config["n_levels"], config["n_features_per_level"], config["log2_hashmap_size"], 4, 64
        )
        self.params = self.grid.params

    def forward(self, x):
        return self.grid(x).half()


def test_tcnn_wrapper_shares_params_and_state_dict_keys(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tinycudann", types.SimpleNamespace(Encoding=_FakeTcnnEncoding))
    assert tcnn_available()
    import engine.fields.hashgrid as hashgrid

    monkeypatch.setattr(hashgrid, "triton_available", lambda: False)  # auto takes Triton first where it runs
    wrapped = make_hash_grid(**SMALL, backend="auto")
    assert type(wrapped).__name__ == "TcnnHashGridEncoding"
    monkeypatch.setattr(hashgrid, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert hashgrid.auto_backend() == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # below Triton's
    assert hashgrid.auto_backend() == "tcnn"
    assert wrapped.output_dim == 12 and wrapped.n_levels == 6 and wrapped.n_features_per_level == 2
    assert list(wrapped.state_dict()) == ["params"] == list(HashGridEncoding(**SMALL).state_dict())
    assert list(wrapped.parameters()) == [wrapped.params]  # registered once
    out = wrapped(torch.rand(3, 3))
    assert out.shape == (3, 12) and out.dtype == torch.float32
