"""What a reconstruction method is to the shared training loop (engine.system).

A method is a small composition, not a loop of its own: which field the loop renders (the radiance
field itself, or a wrapper around it), which of the loop's loss terms count and how much, and hooks
the loop calls on its schedule. A new method is a new module here plus one line in METHODS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from ..config import ReconstructionConfig
    from ..system import RealFusionSystem


class Method:
    name: ClassVar[str]
    title: ClassVar[str]  # for menus
    description: ClassVar[str]  # one line, for menus and --help
    # loss weights that replace the config's for this method, e.g. {"image": 0.0}
    loss_overrides: ClassVar[dict[str, float]] = {}

    def __init__(self, system: "RealFusionSystem"):
        """Called at the end of the system's construction: its field, EMA and reference are there."""
        self.system = system

    def loss_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """Weight of each of the loop's loss terms, from the loop's own (the config's, on its schedule);
        0: the term is not computed or not counted."""
        return {**weights, **self.loss_overrides}

    def training_field(self) -> nn.Module:
        """The field the fit renders (gradients reach the system's field through it)."""
        return self.system.field

    def display_field(self, field: nn.Module) -> nn.Module:
        """The field previews, the turntable and `render` draw, given the (averaged) radiance field."""
        return field

    def before_step(self) -> None:
        """Schedule hook, before each fit iteration (`self.system.step` is the iteration about to run)."""

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this method exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def saved_field_state(self, field: nn.Module) -> dict | None:
        """What field.pt must hold besides the radiance field (the averaged `field`) for `restore_field`."""
        return None

    @classmethod
    def restore_field(cls, field: nn.Module, state: dict | None, cfg: "ReconstructionConfig") -> nn.Module:
        """The field the export reads, rebuilt around the saved radiance field from `saved_field_state`."""
        return field

    @classmethod
    def outline_mask(cls, mask, cfg: "ReconstructionConfig"):
        """The object's mask (a PIL image at the photo's size) that the export matches the mesh's outline to."""
        return mask
