"""field.pt: the averaged field of a finished fit, and what is needed to rebuild it as its method drew it.

The pipeline writes it (`field_payload`), the export reads it back (`load_field`): for ConRad that is
the radiance field wrapped in its constrained field, with the photo, the camera and the surface depth
it was saved with, so the mesh is baked from the very field the previews and the turntable showed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .cameras import reference_camera
from .config import ReconstructionConfig
from .methods import method_for

if TYPE_CHECKING:
    from .system import RealFusionSystem

FIELD_FILE = "field.pt"


def field_payload(system: "RealFusionSystem") -> dict:
    """The averaged field, its background, the config, and the method's part (`Method.saved_field_state`)."""
    field_ema, *rest = system.ema.shadow
    field_ema.level_mask.copy_(system.field.level_mask)
    return {
        "field": field_ema.state_dict(),
        "background": rest[0].state_dict() if rest else None,
        "config": system.cfg.to_dict(),
        "occupancy": system.occupancy.state_dict(),  # empty space as the renderer saw it: the export keeps it empty
        "step": system.step,
        "reference_camera": {"c2w": reference_camera(system.cfg.camera, 1).c2w[0].tolist(),
                             "fovy_deg": system.cfg.camera.ref_fovy_deg},
        "method_state": system.method.saved_field_state(field_ema),
    }


def load_field(path: Path, device: torch.device) -> tuple[torch.nn.Module, ReconstructionConfig]:
    """The field `path` holds, as its method draws it (in eval mode, on `device`), and the run's config.

    Raises whatever reading fails with; the caller says which file and what to do.
    """
    from .fields.radiance_field import RadianceField
    from .renderer import OccupancyGrid, OccupiedField

    state = torch.load(path, map_location=device, weights_only=False)
    cfg = ReconstructionConfig.from_dict(state["config"])
    field = RadianceField(cfg.field).to(device)
    field.load_state_dict(state["field"])
    if state.get("occupancy") is not None:  # empty space as the renderer saw it: the export keeps it empty
        render = cfg.render
        grid = OccupancyGrid(render.occupancy_resolution, cfg.field.bound, render.occupancy_decay,
                             render.occupancy_threshold).to(device)
        grid.load_state_dict(state["occupancy"])
        field = OccupiedField(field, grid)
    field = method_for(cfg.method).restore_field(field, state.get("method_state"), cfg).to(device)
    return field.eval(), cfg
