"""One error type for bad input, shared by every layer.

An :class:`InputError` is something the user can fix: its message names the key or file, the value, and what is
allowed. Every command catches it, prints the message and exits non-zero; anything else is a bug and keeps its
traceback. Layers refine it where a caller needs to tell cases apart (``RecipeError``, ``CurationError``...), always
as subclasses, so one ``except InputError`` covers them all.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used; the message names the key or file, the value and what is allowed."""


class ConfigError(InputError):
    """A configuration file or ``--set`` override that cannot be used (recipes, training configs, experiments)."""


class DatasetError(InputError):
    """A dataset on disk that is not what its manifest says, or an output folder that cannot be used."""


class ServiceError(InputError):
    """A service the command depends on (tracking server, database, object storage) stopped answering; the message
    names it, says what was done about the work in progress and what to do."""
