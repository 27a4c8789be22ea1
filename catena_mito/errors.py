"""The project's exception hierarchy.

Every error a user can cause derives from :class:`CatenaError`. The CLI turns one into a
single line on stderr and exits with :attr:`CatenaError.exit_code` (2 for usage and
configuration errors, 1 for runtime errors); ``--debug`` shows the traceback.
Messages name the field or path, the value, and what was expected.
"""

from __future__ import annotations


class CatenaError(Exception):
    """Base class of every error the project raises on purpose."""

    exit_code = 1


class ConfigError(CatenaError):
    """A configuration value, a command-line flag or a config file is invalid."""

    exit_code = 2


class ShardError(ConfigError):
    """The shard index or shard count is invalid."""


class StorageError(CatenaError):
    """A URL cannot be opened, read or written, or an existing output is incompatible."""


class DataError(CatenaError):
    """Input data has the wrong shape, dtype, values or layout."""


class CheckpointError(CatenaError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the config."""


class RunMismatchError(ConfigError):
    """An output holds (or is being written by) another run: other settings, plan or inputs.

    Refused before any work; ``--overwrite`` replaces the other run's output.
    """


class IncompleteInputError(DataError):
    """An input written by catena-mito is incomplete, or its producing run changed since."""


class PhaseError(CatenaError):
    """A phase was started before the phase it needs had completed."""


class Stopped(BaseException):
    """The process was asked to stop (SIGTERM): raised between blocks, never inside one.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception``
    turns it into another error on its way to the CLI, which exits with :attr:`exit_code`.
    """

    exit_code = 143  # 128 + SIGTERM, what schedulers expect of a terminated process
