"""Config files and their merge with command-line options.

One source of defaults: the config dataclass (``TeacherConfig``, ``DistillConfig``).
Precedence, lowest first: dataclass defaults < ``--config FILE`` (YAML or JSON) <
options given on the command line. ``resolve_config`` does the merge; values from
the file go through the same click types (ranges, choices) as the options, so a
file cannot smuggle in what the command line would refuse.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

__all__ = [
    "ConfigError",
    "load_config_file",
    "check_keys",
    "check_type",
    "resolve_config",
    "config_to_dict",
    "dump_config",
]


class ConfigError(ValueError):
    """A config file that cannot be read, or holds keys or values the config does not take."""


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON file holding one mapping of config keys.

    ``.json`` files are parsed as JSON; anything else as YAML (a superset of JSON).
    An empty file is an empty mapping.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file") from None
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            reason = " ".join(str(exc).split())
            raise ConfigError(f"config file {path} is not valid YAML: {reason}") from None
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, found a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {path}: keys must be strings, found {bad!r}")
    return data


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(cls, values: Mapping[str, Any], source: str) -> None:
    """Raise ConfigError naming every key of ``values`` that ``cls`` has no field for."""
    names = _field_names(cls)
    # Accept the command-line spelling (dashes) as well as the field name.
    unknown = sorted(k for k in values if k.replace("-", "_") not in names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(names)}")


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)
    return f"{json.dumps(value) if isinstance(value, (bool, int, float, str)) else value!r} ({kind})"


def check_type(cls, name: str, value: Any) -> None:
    """Refuse a file value whose type differs from the field's (no coercion: ``steps: 2.7`` is an error).

    A field's type is read from its default: bool, int (not bool), float (int or float), str,
    tuple/list (a list, or a comma-separated string). ``null`` is refused unless the default is None.
    """
    default = next((f.default for f in dataclasses.fields(cls) if f.name == name), dataclasses.MISSING)
    if default is dataclasses.MISSING or default is None:
        return
    if value is None:
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else json.dumps(default)
        raise ValueError(f"null is not a value; remove the key to keep the default ({shown or 'empty'})")
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "text"
    elif isinstance(default, (tuple, list)):
        ok, want = isinstance(value, (list, str, int)) and not isinstance(value, bool), "a list"
    else:
        return
    if not ok:
        raise ValueError(f"expected {want}, got {_describe(value)}")


def resolve_config(
    cls,
    options: Mapping[str, Any],
    given: set[str] | frozenset[str],
    config_file: str | os.PathLike | None = None,
    convert: Callable[[str, Any], Any] | None = None,
):
    """Build ``cls`` from defaults < ``config_file`` < explicitly given options.

    options     -- every option value click parsed (defaults included), by field name.
    given       -- the field names the user set on the command line (or environment);
                   only these override the file.
    config_file -- a YAML/JSON mapping of field names (dashes allowed) to values.
    convert     -- ``convert(name, value)``: checks and converts a value read from the
                   file, e.g. with the option's click type. Raise ValueError to refuse it.
    """
    names = _field_names(cls)
    values: dict[str, Any] = {}
    if config_file is not None:
        file_values = load_config_file(config_file)
        check_keys(cls, file_values, f"config file {os.fspath(config_file)}")
        for key, value in file_values.items():
            name = key.replace("-", "_")
            try:
                check_type(cls, name, value)
            except ValueError as exc:
                raise ConfigError(f"config file {os.fspath(config_file)}: {name}: {exc}") from None
            if convert is not None:
                try:
                    value = convert(name, value)
                except ValueError as exc:
                    raise ConfigError(f"config file {os.fspath(config_file)}: {name}: {exc}") from None
            values[name] = value
    for name in names:
        if name in options and (name in given or name not in values):
            values[name] = options[name]
    return cls(**values)


def config_to_dict(cfg) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def dump_config(cfg) -> str:
    """The resolved config as indented JSON, as ``--dry-run`` prints it."""
    return json.dumps(config_to_dict(cfg), indent=2)
