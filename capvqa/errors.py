"""User-facing errors.

Anything a user can fix (a bad file, an unknown config key, a missing model) raises a subclass of
:class:`UserError` whose message says which file / line / id is wrong and what to do. The CLI prints
that message without a traceback and exits with status 2; library callers can catch it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; the message must be actionable on its own."""


class DataError(UserError):
    """A dataset, annotation or prediction file is missing, malformed or inconsistent."""


class ConfigError(UserError):
    """A pipeline config or override is invalid."""


class ModelLoadError(UserError):
    """A model could not be loaded (offline, wrong path, wrong architecture)."""
