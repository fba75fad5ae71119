"""The reconstruction methods, listed in one place.

Every method runs in the one shared training loop (engine.system); a method is a small composition
(engine/methods/base.py): which field the loop renders, which loss terms count, which schedule hooks
run. The CLI, the job server and /health take their list of methods from `METHODS`.
"""

from __future__ import annotations

from ..errors import EngineError
from .base import Method
from .conrad import ConRad
from .realfusion import RealFusion

METHODS: dict[str, type[Method]] = {method.name: method for method in (RealFusion, ConRad)}


class UnknownMethodError(EngineError):
    exit_code = 2

    def __init__(self, name: str):
        super().__init__(f"Unknown method {name!r}; the methods are {', '.join(METHODS)}.",
                         f"Use --method {' or --method '.join(METHODS)}.")


def method_for(name: str) -> type[Method]:
    """The method called `name`, or an UnknownMethodError that lists them."""
    if name not in METHODS:
        raise UnknownMethodError(name)
    return METHODS[name]


__all__ = ["METHODS", "ConRad", "Method", "RealFusion", "UnknownMethodError", "method_for"]
