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
