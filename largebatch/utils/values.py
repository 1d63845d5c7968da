"""Checking a user-given value against the type of the default it replaces.

Options whose defaults come from a function's signature (optimizer
hyperparameters, task options) have no declared schema beyond that default, so a
value is accepted when it has the default's type: a number for a float, an
integer for an int, true or false for a bool, a list of as many items for a
tuple. Without this check a wrong type reaches the constructor and fails there
with a message that names neither the option nor the expected type.
"""

from __future__ import annotations

from typing import Any

from largebatch.utils.errors import ConfigError


def is_number(value: Any) -> bool:
    """An int or float, but not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_like(default: Any, value: Any) -> Any:
    """``value`` converted to the type of ``default``, or :class:`ConfigError` saying the type.

    A float default takes ints (returned as floats); a ``None`` default or one of
    another type (a dtype, a config object) accepts anything. The message is
    only what was expected (``expected a number (default 0.9)``): callers add
    the option's name.
    """
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError("expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer (default {default!r})")
        return value
    if isinstance(default, float):
        if not is_number(value):
            raise ConfigError(f"expected a number (default {default!r})")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str) or not value:
            raise ConfigError("expected a non-empty string")
        return value
    if isinstance(default, tuple | list):
        if not isinstance(value, list | tuple) or len(value) != len(default):
            raise ConfigError(f"expected a list of {len(default)} values (default {list(default)})")
        return type(default)(check_like(d, v) for d, v in zip(default, value))
    return value
