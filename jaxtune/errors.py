"""User-facing errors: bad input that the user can fix.

Each carries one message naming what is wrong and where (key, file, row or tensor). Entry
modules catch `JaxtuneError`, print `error: <message>` to stderr and exit with status 2, so a
user never sees a traceback from deep inside JAX for a mistake in their own input.
"""


class JaxtuneError(Exception):
    """Base class of errors caused by the user's input, not by a bug in jaxtune."""


class ConfigError(JaxtuneError):
    """A config key is unknown, missing, of the wrong type or out of range."""


class DataError(JaxtuneError):
    """A dataset is missing, unreachable, or has a malformed row."""


class ConversionError(JaxtuneError):
    """A checkpoint folder cannot be converted: missing, extra or mis-shaped tensors, unknown model."""


class CheckpointError(JaxtuneError):
    """A checkpoint directory cannot be written or read."""
