"""The Triton hash grid computes what the torch backend computes (outputs, table and input gradients).

On the CPU the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 before Triton
itself is first imported (its own library functions are decorated then). So the checks below run
in a child Python started with it; `test_triton_kernels_under_the_interpreter` starts it and fails
with the child's traceback. Skipped when Triton is not installed.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from engine.errors import DeviceError
from engine.fields.hashgrid import HashGridEncoding, make_hash_grid

# Levels of resolution 4, 7 (dense) and 13, 22, 37, 64 (hashed into 2**10 entries), as test_hashgrid.
SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, finest_resolution=64)
MODULE = "engine.fields.hashgrid_triton"


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stdout + child.stderr
    assert "all triton checks passed" in child.stdout


def main() -> int:
    """In the child: every check_* below, with the kernels interpreted."""
    module = importlib.import_module(MODULE)
    assert module.interpreting(), "TRITON_INTERPRET=1 was not set before triton was imported"
    failed = 0
    checks = [(name, fn) for name, fn in globals().items() if name.startswith("check_")]
    for name, fn in checks:
        try:
            fn(module)
            print(f"ok {name}")
        except Exception:
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}")
    if not failed:
        print(f"all triton checks passed ({len(checks)})")
    return 1 if failed else 0


def _pair(module, params_scale: float = 1.0, **config):
    torch.manual_seed(0)
    ours = HashGridEncoding(**config)
    fused = module.TritonHashGridEncoding(**config)
    with torch.no_grad():
        ours.params.uniform_(-params_scale, params_scale)  # O(1) values: interpolation errors show
        fused.params.copy_(ours.params)
    return ours, fused


def _points(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, generator=generator)
    # cell corners, the box's corners and points slightly outside (which wrap like tcnn)
    x[:6] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [-0.01, 0.5, 1.01],
                          [0.5, 0.5, 0.5], [0.25, 0.75, 0.125]])
    return x


def check_outputs_and_gradients_match_the_torch_backend(triton_grid):
    for features in (2, 4):
        _compare_with_torch(triton_grid, features)


def _compare_with_torch(triton_grid, features):
    config = dict(SMALL, n_features_per_level=features)
    ours, fused = _pair(triton_grid, **config)
    x = _points(301)  # not a multiple of the kernel's block: the tail is masked
    x_ours, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_fused = ours(x_ours), fused(x_fused)
    assert out_fused.shape == out_ours.shape == (301, 6 * features) and out_fused.dtype == torch.float32
    torch.testing.assert_close(out_fused, out_ours, rtol=0, atol=1e-6)

    weights = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(2))
    (out_ours * weights).sum().backward()
    (out_fused * weights).sum().backward()
    scale = ours.params.grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(fused.params.grad, ours.params.grad, rtol=0, atol=1e-5 * float(scale))
    assert torch.equal(fused.params.grad != 0, ours.params.grad != 0)  # the same entries touched
    torch.testing.assert_close(x_fused.grad, x_ours.grad, rtol=1e-4, atol=1e-4 * float(x_ours.grad.abs().max()))


def check_table_gradient_without_input_gradient(triton_grid):
    ours, fused = _pair(triton_grid, **SMALL)
    x = _points(130)
    ours(x).square().sum().backward()
    fused(x).square().sum().backward()
    torch.testing.assert_close(fused.params.grad, ours.params.grad, rtol=1e-5, atol=1e-6)


def check_factory_state_dict_and_leading_shape(triton_grid):
    fused = make_hash_grid(**SMALL, backend="triton")
    assert isinstance(fused, triton_grid.TritonHashGridEncoding)
    assert list(fused.state_dict()) == ["params"] == list(HashGridEncoding(**SMALL).state_dict())
    assert fused.params.numel() == HashGridEncoding(**SMALL).params.numel()
    assert fused(torch.rand(2, 5, 3)).shape == (2, 5, 12)
    assert fused(torch.rand(0, 3)).shape == (0, 12)


def check_triton_refuses_the_cpu_outside_the_interpreter(triton_grid):
    fused = triton_grid.TritonHashGridEncoding(**SMALL)
    triton_grid._INTERPRETED = False
    try:
        with pytest.raises(DeviceError) as info:
            fused(torch.rand(4, 3))
    finally:
        triton_grid._INTERPRETED = True
    assert "backend 'torch'" in info.value.fix


def test_triton_backend_is_refused_without_cuda_or_interpreter():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton can run here")
    with pytest.raises(DeviceError) as info:
        make_hash_grid(**SMALL, backend="triton")
    assert "backend 'torch'" in info.value.fix
    assert isinstance(make_hash_grid(**SMALL, backend="auto"), HashGridEncoding)


if __name__ == "__main__":
    sys.exit(main())


KERNEL_SIGNATURE = {"x_ptr": "*fp32", "params_ptr": "*fp32", "scale_ptr": "*fp32", "mult_ptr": "*i32",
                    "size_ptr": "*i32", "hashed_ptr": "*i32", "offset_ptr": "*i64", "n_points": "i32",
                    "n_levels": "i32", "F": "constexpr", "BLOCK": "constexpr"}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted in this process")
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs the kernels as Python; this compiles them for an H100/H200 (sm_90) down to a
    cubin with Triton's bundled toolchain, which catches what only the compiler sees (types, constexprs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(MODULE)
    pointers = {"out_ptr": "*fp32"}
    forward = dict(list(KERNEL_SIGNATURE.items())[:2] + list(pointers.items()) + list(KERNEL_SIGNATURE.items())[2:])
    backward = dict(list(KERNEL_SIGNATURE.items())[:2] + [("grad_out_ptr", "*fp32"), ("grad_params_ptr", "*fp32"),
                                                         ("grad_x_ptr", "*fp32")]
                    + list(KERNEL_SIGNATURE.items())[2:] + [("NEED_GRAD_X", "constexpr")])
    cases = [(module._hash_grid_forward, forward, {"F": 2, "BLOCK": module.BLOCK_POINTS})]
    cases += [(module._hash_grid_backward, backward, {"F": 2, "BLOCK": module.BLOCK_POINTS, "NEED_GRAD_X": need})
              for need in (True, False)]
    for kernel, signature, constants in cases:
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                      target=GPUTarget("cuda", 90, 32))
        except Exception as error:  # noqa: BLE001
            if "ptxas" in repr(error).lower() and "not found" in repr(error).lower():
                pytest.skip(f"Triton's CUDA toolchain is missing here: {error!r}")
            raise
        ttir = compiled.asm["ttir"]
        assert "arith.remui" in ttir and "math.fma" in ttir  # unsigned modulo (uint32 hashing) and tcnn's fma
