"""GroupNorm for the prior's networks at batch 1-4: statistics by reductions that use the whole GPU.

PyTorch's CUDA group norm gives each (sample, group) row one thread block. The VAE encodes one
512 px render per SDS step: 32 rows of a million values at its first level, so 32 blocks on a GPU
of 132 multiprocessors, and the moments kernel alone took 6.2 ms of a 55 ms fit step on an H200
(bench/results/steps_sd15_nvidia-h200_s26a.json, the profile). It also returns contiguous NCHW
whatever it is given, so in a channels-last network every norm costs a transpose there and back.

`SplitGroupNorm` computes the same normalisation with `torch.var_mean` (a reduction split over
as many blocks as the GPU has) and elementwise ops that keep the input's memory layout, in float32
whatever the input's dtype (as PyTorch's kernel accumulates), then casts back. Its backward is the
closed form (one pass for the two group means the input's gradient needs), so autograd keeps no
float32 copies of the activations. `use_split_group_norm(module, on)` switches every nn.GroupNorm of a
module in place (the same parameters). tests/test_fast_paths.py checks it against F.group_norm.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("native", "split")


class _SplitGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                groups: int, eps: float) -> torch.Tensor:
        grouped = _grouped(_wide(x), groups)
        var, mean = torch.var_mean(grouped, dim=_group_dims(grouped), correction=0, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        y = ((grouped - mean) * rstd).flatten(1, 2)
        if weight is not None:
            y = y * _per_channel(weight, x)
        if bias is not None:
            y = y + _per_channel(bias, x)
        ctx.groups = groups
        ctx.save_for_backward(x, weight, mean, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        dy = _wide(dy)
        x_hat = (_grouped(_wide(x), ctx.groups) - mean) * rstd
        dx = dweight = dbias = None
        if need_x:
            scaled = _grouped(dy * _per_channel(weight, x) if weight is not None else dy, ctx.groups)
            dims = _group_dims(scaled)
            # d/dx of (x - mean) * rstd: subtract the gradient's group mean and its projection on x_hat
            dx = ((scaled - scaled.mean(dims, keepdim=True) - x_hat * (scaled * x_hat).mean(dims, keepdim=True))
                  * rstd).flatten(1, 2).to(x.dtype)
        channel_dims = (0,) + tuple(range(2, x.dim()))
        if need_weight and weight is not None:
            dweight = (dy * x_hat.flatten(1, 2)).sum(channel_dims).to(weight.dtype)
        if need_bias:
            dbias = dy.sum(channel_dims).to(dy.dtype if weight is None else weight.dtype)
        return dx, dweight, dbias, None, None


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, C, *S] as the view [N, G, C / G, *S] (a view in NCHW and in channels-last alike)."""
    return x.unflatten(1, (groups, x.shape[1] // groups))


def _group_dims(grouped: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, grouped.dim()))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _wide(values).view((1, -1) + (1,) * (like.dim() - 2))


def split_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps), by GPU-wide reductions, in x's dtype and memory layout."""
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    return _SplitGroupNorm.apply(x, weight, bias, groups, eps)


class SplitGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed by `split_group_norm` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def use_split_group_norm(module: nn.Module, on: bool) -> bool:
    """Switch every GroupNorm of `module` to `SplitGroupNorm` (on) or back to nn.GroupNorm, in place.
    Whether anything changed."""
    changed = False
    target = SplitGroupNorm if on else nn.GroupNorm
    for child in module.modules():
        if type(child) in (nn.GroupNorm, SplitGroupNorm) and type(child) is not target:  # not others' subclasses
            child.__class__ = target
            changed = True
    return changed


def uses_split_group_norm(module: nn.Module) -> bool:
    return any(type(child) is SplitGroupNorm for child in module.modules())
