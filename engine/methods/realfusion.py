"""RealFusion (Melas-Kyriazi et al., 2023): the field alone, fitted to the photo by its image and mask losses
in the reference view, and to the prior (SDS with a token learned from the photo) everywhere else."""

from __future__ import annotations

from .base import Method


class RealFusion(Method):
    name = "realfusion"
    title = "RealFusion"
    description = "Single-image textual inversion + score distillation (Melas-Kyriazi et al. 2023)"
