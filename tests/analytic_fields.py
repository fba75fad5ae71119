"""Fields with known answers, for testing the renderer and the loop against closed forms."""

import torch


class SphereField(torch.nn.Module):
    """A solid sphere of constant density; albedo red on +X half, blue on the -X half."""

    def __init__(self, radius=0.4, density=200.0, center=(0.0, 0.0, 0.0)):
        super().__init__()
        self.radius = radius
        self.density_value = density
        self.register_buffer("center", torch.tensor(center))

    def density(self, x):
        inside = ((x - self.center).norm(dim=-1) < self.radius).float()
        return inside * self.density_value

    def forward(self, x):
        red = (x[:, 0] > self.center[0]).float()[:, None]
        albedo = red * torch.tensor([1.0, 0.0, 0.0]) + (1 - red) * torch.tensor([0.0, 0.0, 1.0])
        return self.density(x), albedo

    def normals(self, x, epsilon):
        n = x - self.center
        return n / n.norm(dim=-1, keepdim=True).clamp(min=1e-8)


class UniformField(torch.nn.Module):
    """Constant density and color everywhere: opacity has a closed form 1 - exp(-sigma * length)."""

    def __init__(self, density=1.0, color=(0.2, 0.6, 0.4)):
        super().__init__()
        self.density_value = density
        self.register_buffer("color", torch.tensor(color))

    def forward(self, x):
        return torch.full((x.shape[0],), self.density_value), self.color.expand(x.shape[0], 3)

    def normals(self, x, epsilon):
        return torch.nn.functional.normalize(x, dim=-1)
