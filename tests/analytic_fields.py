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

    def density(self, x):
        return torch.full((x.shape[0],), self.density_value)

    def forward(self, x):
        return self.density(x), self.color.expand(x.shape[0], 3)

    def normals(self, x, epsilon):
        return torch.nn.functional.normalize(x, dim=-1)


class ShapeField(torch.nn.Module):
    """An analytic solid (a signed distance `sdf`) with a color pattern, as a volume a renderer draws crisply.

    Density is peak * sigmoid(-sdf / width) with peak * width = 1: a ray meeting the surface head-on
    then reaches optical depth ln 2 (transmittance 1/2, where renderer and exporter put the surface)
    exactly at sdf = 0, so the shape the field shows *is* the analytic shape.
    """

    bound = 0.75

    def __init__(self, width=0.005):
        super().__init__()
        self.width = width
        self.peak = 1.0 / width

    def sdf(self, x):
        raise NotImplementedError

    def albedo(self, x):
        raise NotImplementedError

    def density(self, x):
        return self.peak * torch.sigmoid(-self.sdf(x) / self.width)

    def forward(self, x):
        return self.density(x), self.albedo(x).clamp(0.0, 1.0)

    def normals(self, x, epsilon):
        offsets = torch.eye(3, dtype=x.dtype) * epsilon
        gradient = torch.stack([self.sdf(x + o) - self.sdf(x - o) for o in offsets], -1)
        return torch.nn.functional.normalize(gradient, dim=-1)


class BallField(ShapeField):
    """A ball; its color is a gradient along all three axes, so any flip or swap of the texture shows."""

    def __init__(self, radius=0.4, **kwargs):
        super().__init__(**kwargs)
        self.radius = radius

    def sdf(self, x):
        return x.norm(dim=-1) - self.radius

    def albedo(self, x):
        return 0.5 + 0.45 * x / self.radius


class BoxField(ShapeField):
    """An axis-aligned box colored like a die: each of its six faces has its own color."""

    FACE_COLORS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.8],  # +X, -X
                                [0.1, 0.8, 0.1], [0.8, 0.1, 0.8],  # +Y, -Y
                                [0.1, 0.2, 0.9], [0.9, 0.9, 0.1]])  # +Z, -Z

    def __init__(self, half_size=(0.4, 0.3, 0.2), **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("half_size", torch.tensor(half_size))

    def sdf(self, x):
        q = x.abs() - self.half_size
        return q.clamp(min=0.0).norm(dim=-1) + q.amax(-1).clamp(max=0.0)

    def albedo(self, x):
        scaled = x / self.half_size
        axis = scaled.abs().argmax(-1)
        negative = (scaled.gather(-1, axis[:, None])[:, 0] < 0).long()
        return self.FACE_COLORS[2 * axis + negative]


class TorusField(ShapeField):
    """A torus around Z; its color turns once through the hues around the ring."""

    def __init__(self, major=0.4, minor=0.15, **kwargs):
        super().__init__(**kwargs)
        self.major, self.minor = major, minor

    def sdf(self, x):
        ring = torch.stack([x[:, :2].norm(dim=-1) - self.major, x[:, 2]], -1)
        return ring.norm(dim=-1) - self.minor

    def albedo(self, x):
        angle = torch.atan2(x[:, 1], x[:, 0])[:, None]
        phases = torch.tensor([0.0, 2.0944, -2.0944])
        return 0.5 + 0.45 * torch.cos(angle - phases)


class EmptyField(torch.nn.Module):
    """Nothing anywhere."""

    bound = 0.75

    def density(self, x):
        return torch.zeros(x.shape[0])

    def forward(self, x):
        return self.density(x), torch.full((x.shape[0], 3), 0.5)
