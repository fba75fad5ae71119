"""ConRad (Purushwalkam & Naik, 2023): the image-constrained field, engine/fields/constrained.py.

The fit renders the radiance field through a `ConstrainedField`, so the reference view shows the photo
by construction: the color image loss is dropped (it has nothing left to ask), the mask loss stays (the
field still decides where the object is), and textual inversion + SDS stay as in RealFusion. The depth of
the visible surface is re-estimated from the field every `conrad.depth_refresh_every` iterations;
previews and the turntable draw the averaged field with a depth estimated from that field itself, and
field.pt keeps the photo, the camera and a depth map at the photo's size, for the export's texture bake.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cameras import reference_camera
from ..errors import ConfigError
from ..fields.constrained import OUTSIDE_MASK, ConstrainedField
from ..renderer import OccupiedField
from .base import Method


class ConRad(Method):
    name = "conrad"
    title = "ConRad"
    description = "Image-constrained radiance field: the photo's own colors on the visible surface (Purushwalkam & Naik 2023)"

    def __init__(self, system):
        super().__init__(system)
        cfg = system.cfg
        reference = system.reference
        rgb = reference.photo_rgb if reference.photo_rgb is not None else reference.rgb
        mask = reference.photo_mask if reference.photo_mask is not None else reference.mask
        camera = reference_camera(cfg.camera, rgb.shape[0], system.device)
        if cfg.conrad.outside_mask not in OUTSIDE_MASK:
            raise ConfigError(f"conrad.outside_mask={cfg.conrad.outside_mask!r} is not one of {', '.join(OUTSIDE_MASK)}.")
        self._wrap = lambda field: ConstrainedField(field, camera.c2w[0], float(camera.fovy[0]), rgb, mask,
                                                    cfg.conrad.delta, bound=cfg.field.bound,
                                                    outside_mask=cfg.conrad.outside_mask)
        self.fit_field = self._wrap(system.field)
        self.display = {}  # id(field) -> its wrapper: the averaged field and, for use_ema=False, the field itself

    def loss_weights(self, weights: dict[str, float]) -> dict[str, float]:
        return {**weights, "image": self.system.cfg.conrad.image_loss}

    # --- the depth of the visible surface, on a schedule -------------------------------------------

    def _depth_settings(self, field: nn.Module, resolution: int | None = None) -> dict:
        """How to estimate the depth: from `field` as the renderer sees it (the occupancy grid's empty cells
        hold no density there), at the configured size and number of steps."""
        cfg = self.system.cfg
        return {"source": OccupiedField(field, self.system.occupancy),
                "resolution": resolution or cfg.conrad.depth_resolution or cfg.render.ref_resolution,
                "num_samples": cfg.conrad.depth_samples,
                "threshold": cfg.conrad.depth_threshold}

    def before_step(self) -> None:
        step = self.system.step
        every = max(1, self.system.cfg.conrad.depth_refresh_every)
        if self.fit_field.depth_step < 0 or step % every == 0:
            self.fit_field.refresh_depth(**self._depth_settings(self.fit_field.field), step=step)

    def training_field(self) -> nn.Module:
        return self.fit_field

    def display_field(self, field: nn.Module) -> nn.Module:
        wrapper = self.display.get(id(field))
        if wrapper is None or wrapper.field is not field:
            wrapper = self.display[id(field)] = self._wrap(field)
        if wrapper.depth_step != self.system.step:  # the field changed since: look again
            wrapper.refresh_depth(**self._depth_settings(field), step=self.system.step)
        return wrapper

    # --- checkpoints and field.pt ------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"depth": self.fit_field.depth[0, 0].detach().cpu(), "depth_step": self.fit_field.depth_step}

    def load_state_dict(self, state: dict) -> None:
        if state and "depth" in state:
            self.fit_field.set_depth(state["depth"], state["depth_step"])

    def saved_field_state(self, field: nn.Module) -> dict:
        """The photo at its own size and the averaged field's depth at that size: the export bakes from these."""
        wrapper = self._wrap(field)
        wrapper.refresh_depth(**self._depth_settings(field, resolution=wrapper.height), step=self.system.step)
        return wrapper.saved_state()

    @classmethod
    def restore_field(cls, field: nn.Module, state: dict | None, cfg) -> nn.Module:
        if state is None:
            raise ValueError("field.pt of a conrad run holds no constrained-field state")
        return ConstrainedField.from_saved_state(field, {k: torch.as_tensor(v) if k in ("c2w", "rgb", "mask", "depth")
                                                         else v for k, v in state.items()})

    @classmethod
    def outline_mask(cls, mask, cfg):
        """The mask grown by `conrad.outline_dilation_px`: a mesh a little wider than the photo's object costs
        nothing in the reference view (its rim takes the photo's background), one a little narrower does."""
        from PIL import ImageFilter

        grow = cfg.conrad.outline_dilation_px
        return mask.filter(ImageFilter.MaxFilter(2 * grow + 1)) if grow > 0 else mask
