"""Errors a user can act on.

Every failure the engine expects (bad image, missing weights, no GPU, ...) is an
`EngineError` whose message says what went wrong *and* what to do about it. The CLI
prints it on one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class EngineError(Exception):
    """An expected failure, with the fix in the message."""

    exit_code = 2

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} {fix}")
        self.problem = problem
        self.fix = fix


class InputImageError(EngineError):
    exit_code = 3


class MissingWeightsError(EngineError):
    exit_code = 4


class DeviceError(EngineError):
    exit_code = 5


class OutputDirError(EngineError):
    exit_code = 6


class DiskFullError(OutputDirError):
    """A write failed because the disk (or the user's quota) is full: the server answers 507."""


class ExportError(EngineError):
    """The field cannot be turned into a mesh (empty, fills its box, or a bad export setting)."""

    exit_code = 7


class ConfigError(EngineError):
    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem, fix or "Use --set SECTION.KEY=VALUE with a key as written in config.json "
                                         "(e.g. --set fit.iterations=500).")
