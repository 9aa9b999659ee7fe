"""A config from a TOML recipe and ``--section.key=value`` overrides, each value checked
against its field's type, then validated; and the resolved config written back as TOML
(the run directory's ``config.toml``)."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from dlrm.config.sections import Config
from dlrm.errors import ConfigError
from dlrm.utils.files import read_toml
from dlrm.utils.typed import check_type


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _set(config: Config, key: str, value: Any, where: str) -> None:
    section_name, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(config)}
    if section_name not in sections or not name:
        raise ConfigError(f"{where}: unknown key '{key}' (sections: {', '.join(sorted(sections))})")
    section = getattr(config, section_name)
    types = _field_types(section)
    if name not in types:
        raise ConfigError(
            f"{where}: unknown key '{key}' (known in [{section_name}]: {', '.join(types)})"
        )
    try:
        setattr(section, name, check_type(key, value, types[name]))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _parse_override(arg: str, config: Config) -> tuple[str, Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override '{arg}': expected --section.key=value")
    key, _, raw = arg[2:].partition("=")
    section_name, _, name = key.partition(".")
    section = getattr(config, section_name, None)
    if dataclasses.is_dataclass(section) and _field_types(section).get(name) is str:
        return key, raw
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw  # a bare word: the type check reports it if a string is not wanted


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Loads a TOML recipe, applies ``--section.key=value`` overrides and validates.

    Raises:
        ConfigError: naming the file and the key for unknown keys, wrong types and
            inconsistent values.
    """
    config = Config()
    if path is not None:
        path = Path(path)
        doc = read_toml(path, ConfigError, "config")
        for section_name, table in doc.items():
            if not isinstance(table, dict) or not (table or hasattr(config, section_name)):
                known = ", ".join(f.name for f in dataclasses.fields(config))
                raise ConfigError(f"{path}: unknown key '{section_name}' (sections: {known})")
            for name, value in table.items():
                _set(config, f"{section_name}.{name}", value, str(path))
    for arg in overrides:
        key, value = _parse_override(arg, config)
        _set(config, key, value, "command line")
    config.validate()
    return config


def toml_value(v: Any) -> str:
    """``v`` as TOML writes it (a dict as an inline table; a number as Python writes it)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def to_toml(config: Config) -> str:
    """The resolved config as TOML (written to the run directory)."""

    lines = []
    for f in dataclasses.fields(config):
        lines.append(f"[{f.name}]")
        section = getattr(config, f.name)
        for g in dataclasses.fields(section):
            if getattr(section, g.name) is not None:  # None: absent, the default applies
                lines.append(f"{g.name} = {toml_value(getattr(section, g.name))}")
        lines.append("")
    return "\n".join(lines)
