"""Errors a user can fix, each with a one-line message; the CLI maps them to exit statuses.

This module imports nothing (no torch): `sparse-train --help` and config errors stay fast.
"""

from __future__ import annotations

USER_ERROR = 2  # exit status of every error below except TrainingStopped
TRAINING_STOPPED = 1


class UsageError(Exception):
    """A bad command line."""


class ConfigError(ValueError):
    """An invalid configuration. `str(err)` is one line: the dotted field, then what is wrong."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path = field_path
        self.message = message
        super().__init__(f"{field_path}: {message}" if field_path else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with the field path placed under a parent section name."""
        path = f"{prefix}.{self.field_path}" if self.field_path else prefix
        return ConfigError(path, self.message)


class DataError(ValueError):
    """Unusable data (bad JSONL line, empty corpus, ...); the message names the file and problem."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or incompatible."""


class LaunchError(Exception):
    """A job that cannot start (no Ray, unreachable cluster, too few resources)."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class OutOfMemory(TrainingStopped):
    """A training step ran out of memory; the message names the layout and the measured peak."""
