"""How the frozen dataclass tree in `config` is read: YAML mappings and `--section.field` flags, coerced to each
field's type with one clear error, and the help text taken from each field's metadata."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any

from budgetlora.errors import ConfigError


def field_(default, help: str):
    """A config field with its help text (lists and dicts get a fresh copy per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def set_dotted(d: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown config key: {key}")
        node = node[p]
    if leaf not in node:
        raise ConfigError(f"unknown config key: {key}")
    node[leaf] = value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in sorted(unknown))}")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = build(t, d[f.name] or {}, prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(d[f.name], t, prefix + f.name)
    return cls(**kwargs)


def parse_bool(value: str) -> bool:
    """'true/yes/on/1' or 'false/no/off/0', any case; ValueError otherwise."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _coerce(value: Any, t, key: str):
    """Turn YAML or CLI strings into the field's type, with one clear error when impossible."""
    try:
        if t is bool:
            return parse_bool(value) if isinstance(value, str) else bool(value)
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if t is float:
            if not math.isfinite(float(value)):  # nan or inf would train to chance accuracy
                raise ValueError
            return float(value)
        if t is str:
            return "" if value is None else str(value)
        if t is list or typing.get_origin(t) is list:
            if value is None:
                return []
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            items = list(value)
            # layers are integers, targets strings: keep YAML's own types, convert numeric strings
            return [int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v for v in items]
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {getattr(t, '__name__', t)}")


def leaves(cls, prefix=""):
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from leaves(t, prefix + f.name + ".")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield prefix + f.name, t, default, f.metadata.get("help", "")


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add `--config FILE` and one `--section.field` flag per config leaf, each with its help and default; the
    sections named in `skip` get none."""
    parser.add_argument("--config", help="YAML config file, or a shipped preset by name: minilm-default, "
                                         "minilm-quick, roberta-m3, ... (flags override it)")
    group = parser.add_argument_group("config fields (override the YAML)")
    for key, t, default, help in leaves(cls):
        if key.split(".")[0] in skip:
            continue
        kind = "list" if (t is list or typing.get_origin(t) is list) else getattr(t, "__name__", str(t))
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        group.add_argument(f"--{key}", dest=f"cfg:{key}", default=None, metavar=kind.upper(),
                           help=f"{help} (default: {shown})")


def from_flags(args: argparse.Namespace, cls):
    base = cls.from_yaml(args.config) if getattr(args, "config", None) else cls()
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return base.replace(**overrides) if overrides else base


def add_section_flags(parser: argparse.ArgumentParser, cls, section: str) -> None:
    """One `--field-name` flag per field of the config section `section` (of type `cls`), each with its help and
    default, overriding `section.field` of `--config` (`from_flags` reads them back). A field's metadata may name
    another spelling ("flag") and the allowed values ("choices"). A bool that defaults to false is a flag alone."""
    group = parser.add_argument_group(f"{section} settings (override the {section}: section of --config)")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t, meta = hints[f.name], f.metadata
        if t is bool and not f.default:
            extra = {"action": "store_const", "const": "true"}
        elif "choices" in meta:
            extra = {"choices": meta["choices"]}
        else:
            extra = {"metavar": "BOOL" if t is bool else getattr(t, "__name__", "value").upper()}
        group.add_argument(f"--{meta.get('flag', f.name.replace('_', '-'))}", dest=f"cfg:{section}.{f.name}",
                           default=None, help=f"{meta['help']} (default: {f.default})", **extra)
