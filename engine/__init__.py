"""RealFusion engine: single image in, radiance field (and mesh) out."""

__version__ = "0.1.0"
