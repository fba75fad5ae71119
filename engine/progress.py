"""Progress records: what every stage reports, and to whom (CLI bars, server events, tests).

Below the pipeline and the export, so both report the same way without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Progress:
    stage: str  # matting | prior | textual_inversion | fit | turntable | export | done
    step: int = 0
    total: int = 0
    metrics: dict = field(default_factory=dict)
    preview: Path | None = None  # set when a new preview image was written


ProgressCallback = Callable[[Progress], None]
