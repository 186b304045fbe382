"""Typed errors melt reports to users as one line.

Every message says what is wrong, what was found, and (where it helps) what to run. The CLI
catches ``MeltError`` once, prints the message in red on stderr and exits with status 1.
"""


class MeltError(Exception):
    """Base class of every error melt reports as a one-line message."""

    exit_code = 1  # the CLI's exit status (an interrupted run: 130 for Ctrl-C, 143 for SIGTERM)


class CheckpointNotFoundError(MeltError):
    """A checkpoint directory or one of its files does not exist."""


class ConfigError(MeltError):
    """config.json is unreadable, or a field has a value melt cannot use."""


class UnsupportedModelError(MeltError):
    """The checkpoint is a model type (or feature) melt does not handle."""


class WeightsMismatchError(MeltError):
    """The weights do not fit the config: missing, unexpected or mis-shaped tensors."""


class CorruptCheckpointError(MeltError):
    """A weights file is truncated or not valid safetensors."""


class OutputExistsError(MeltError):
    """An output directory exists and is not empty (pass --force to replace it)."""


class OutputNotWritableError(MeltError):
    """An output path cannot be created or written (read-only, not a directory, no space)."""


class InvalidArgumentError(MeltError):
    """An option or argument has a value melt cannot use."""


class DeviceNotAvailableError(MeltError):
    """The requested device (e.g. ``cuda``) is not available on this machine."""


class MissingDependencyError(MeltError):
    """An optional dependency (e.g. matplotlib for plots) is not installed."""


class NotEnoughMemoryError(MeltError):
    """An allocation melt can size in advance would not fit in the device's free memory."""


class MeltWarning(UserWarning):
    """Something melt reports as one ``warning:`` line and goes on (NaN weights, ...)."""
