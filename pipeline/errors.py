"""Faults the user can fix, each a one-line message; here, apart from the modules that raise them,
so that a stage can report them without importing torch or mlflow first."""
from pipeline.config import ConfigError
from pipeline.runlock import StageBusy


class DataError(RuntimeError):
    """A dataset problem the user can fix; the message is one actionable line."""


class OutputError(OSError):
    """An output could not be written (disk full, no permission); one line naming it."""


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; the message is one line naming the URI."""


USER_ERRORS = (ConfigError, DataError, TrackingError, OutputError, StageBusy)
