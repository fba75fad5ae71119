"""The field: what is at a point. Density and albedo from a hash grid and a small MLP."""

from __future__ import annotations

import torch
from torch import nn

from ..config import FieldConfig
from .hashgrid import make_hash_grid


class _TruncExp(torch.autograd.Function):
    """exp() whose gradient is clamped, so one large density cannot blow up a step (InstantNGP)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        modules.append(nn.Linear(a, b, bias=True))
        if i < len(dims) - 2:
            modules.append(nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


class RadianceField(nn.Module):
    """Density (trunc-exp, plus a central Gaussian blob that starts the object in the middle) and albedo (sigmoid)."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.bound = cfg.bound
        self.encoding = make_hash_grid(cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size,
                                       cfg.base_resolution, cfg.finest_resolution, backend=cfg.backend)
        self.net = mlp(self.encoding.output_dim, 4, cfg.hidden_dim, cfg.num_layers)
        self.register_buffer("level_mask", torch.ones(self.encoding.output_dim), persistent=False)

    @property
    def n_levels(self) -> int:
        return self.cfg.n_levels

    def set_active_levels(self, active: int) -> None:
        """Coarse-to-fine: features of levels >= `active` read as zero (and so get no gradient)."""
        per_level = self.cfg.n_features_per_level
        self.level_mask.fill_(1.0)
        self.level_mask[active * per_level:] = 0.0

    def grid_parameters(self) -> list[nn.Parameter]:
        return list(self.encoding.parameters())

    def mlp_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def _blob(self, x: torch.Tensor) -> torch.Tensor:
        """The official density bias, a Gaussian: blob_density at the center, never negative."""
        return self.cfg.blob_density * torch.exp(-(x * x).sum(-1) / (2.0 * self.cfg.blob_radius ** 2))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x01 = ((x + self.bound) / (2.0 * self.bound)).clamp(0.0, 1.0)
        return self.encoding(x01).float() * self.level_mask

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points [N,3] in world units -> density [N] and albedo [N,3] in [0,1]."""
        h = self.net(self._features(x))
        sigma = trunc_exp(h[:, 0] + self._blob(x))
        albedo = torch.sigmoid(h[:, 1:])
        return sigma, albedo

    def density(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(self._features(x))
        return trunc_exp(h[:, 0] + self._blob(x))

    def normals(self, x: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Outward unit normals [N,3] as minus the density's central-difference gradient.

        Finite differences rather than autograd: tinycudann has no second derivative,
        and the normal-smoothness loss needs gradients *through* the normals.
        """
        offsets = torch.eye(3, device=x.device, dtype=x.dtype) * epsilon  # [3,3]
        probes = torch.cat([x[:, None, :] + offsets, x[:, None, :] - offsets], 1)  # [N,6,3]
        sigma = self.density(probes.reshape(-1, 3)).reshape(-1, 6)
        gradient = (sigma[:, :3] - sigma[:, 3:]) / (2.0 * epsilon)
        return -gradient / gradient.norm(dim=-1, keepdim=True).clamp(min=1e-8)


class BackgroundField(nn.Module):
    """Background color from the ray's direction (DreamFusion): lets the object not be painted on the sky."""

    def __init__(self, hidden_dim: int, n_frequencies: int = 4):
        super().__init__()
        self.n_frequencies = n_frequencies
        self.net = mlp(3 + 6 * n_frequencies, 3, hidden_dim, 2)

    def _encode(self, d: torch.Tensor) -> torch.Tensor:
        freqs = 2.0 ** torch.arange(self.n_frequencies, device=d.device, dtype=d.dtype) * torch.pi
        angles = d[..., None] * freqs  # [N,3,F]
        return torch.cat([d, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)], -1)

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(self._encode(directions)))
