"""Errors that fedsim reports to the user as one clear line."""

import math


class FedsimError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ConfigError(FedsimError, ValueError):
    """A configuration field has a value that is not allowed (a `ValueError` too, for code
    that builds fedsim's classes directly)."""


class DataError(FedsimError):
    """A data source is malformed or cannot be loaded."""


class MessageError(FedsimError):
    """A peer's message does not match what the run expects (keys, shapes, dtypes, values)."""


class RunFailedError(FedsimError):
    """The run cannot go on (e.g. too many rounds in a row without enough valid replies)."""


def is_number(value: object) -> bool:
    """A finite real number, not a bool: `inf` and `nan` pass every comparison check wrongly
    (`inf > 0`) or silently (`nan` fails none of `not x < 0`), so no setting takes them."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: object) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def require(ok: bool, field: str, allowed: str, value: object) -> None:
    """Raise the one-line `ConfigError` "<field> must be <allowed> (got <value>)" unless `ok`."""
    if not ok:
        raise ConfigError(f"{field} must be {allowed} (got {value!r})")
