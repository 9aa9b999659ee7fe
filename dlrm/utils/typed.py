"""A value read from TOML (a config, a schema) checked against a dataclass field's type
annotation, with an error naming its key."""

from __future__ import annotations

import types
import typing
from typing import Any

from dlrm.errors import ConfigError


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """Returns ``value`` as the type ``annotation`` (an int is a float, a bool is no int;
    of a union, the first arm that takes it), or raises ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        for arm in arms:
            try:
                return check_type(key, value, arm)
            except ConfigError:
                pass
        names = " or ".join("a list" if typing.get_origin(a) is list else a.__name__
                            for a in arms)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is dict:
        _, item = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {k: check_type(f"{key}.{k}", v, item) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value
