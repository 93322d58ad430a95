"""How the frozen dataclass tree in `config` is declared, checked and read. A field is declared once, with `field_`:
its default, its help text and, for a setting with a fixed set of values, those values. Every check goes through
`check`, which reads a field's declared values itself, so the check, the error message and the `--help` text all come
from the one declaration. YAML mappings and `--section.field` flags are coerced to each field's type with one clear
error."""
from __future__ import annotations

import argparse
import sys
import dataclasses
import functools
import math
import typing
from typing import Any, Iterable

from budgetlora.errors import ConfigError


def field_(default, help: str, choices: tuple = (), flag: str = ""):
    """A config field with its help text (lists and dicts get a fresh copy per instance). `choices`: the only values
    the field takes; `check` refuses any other and `--help` lists them. `flag`: a command's flag spelling other than
    the field's name with dashes (an older, shorter one)."""
    metadata = {"help": help}
    if choices:
        metadata["choices"] = tuple(choices)
    if flag:
        metadata["flag"] = flag
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default_of(field: dataclasses.Field):
    """A field's default value (a fresh copy for a list or dict)."""
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def check(section, key: str, rules: Iterable[tuple[bool, str]] = ()) -> None:
    """Refuse a config section built with a bad value, as one ConfigError of one line: first a field outside its
    declared choices, then the first of `rules` ((holds, message) pairs) that does not hold. `key` is the section's
    name in the tree ('train'; '' for the whole config), which the choices' messages start with. Every config check
    raises here and nowhere else."""
    for ok, message in (*_choice_rules(section, key), *rules):
        if not ok:
            raise ConfigError(message)


def _choice_rules(section, key: str) -> list[tuple[bool, str]]:
    """A broken rule for each field whose value is not one of its declared choices."""
    rules = []
    for f in dataclasses.fields(section):
        allowed, value = f.metadata.get("choices"), getattr(section, f.name)
        if allowed and value not in allowed:
            name = f"{key}.{f.name}" if key else f.name
            rules.append((False, f"{name} must be one of {', '.join(allowed)}, got {value!r}"))
    return rules


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted.key: leaf}, the inverse of set_dotted."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # slow (it compiles every annotation), and a class's hints never change


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
    """(dotted key, field, type) of every leaf of the tree under `cls`, in field order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from leaves(t, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, t


def _metavar(f: dataclasses.Field, t) -> str:
    """How --help shows a flag's value: a field's declared choices as argparse shows choices ({a,b,c}), else its type.
    The value itself is checked by the config, not by argparse, so that a bad one is the config's one-line error
    whether it came from a flag, a YAML file or Python."""
    if "choices" in f.metadata:
        return "{" + ",".join(f.metadata["choices"]) + "}"
    if t is bool:
        return "BOOL"
    return "LIST" if (t is list or typing.get_origin(t) is list) else getattr(t, "__name__", "value").upper()


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add `--config FILE` and one `--section.field` flag per config leaf, each with its help and default; the
    sections named in `skip` get none."""
    parser.add_argument("--config", help="YAML config file, or a shipped preset by name: minilm-default, "
                                         "minilm-quick, roberta-m3, ... (flags override it)")
    group = parser.add_argument_group("config fields (override the YAML)")
    for key, f, t in leaves(cls):
        if key.split(".")[0] in skip:
            continue
        default = default_of(f)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        group.add_argument(f"--{key}", dest=f"cfg:{key}", default=None, metavar=_metavar(f, t),
                           help=f"{f.metadata['help']} (default: {shown})")


def from_flags(args: argparse.Namespace, cls):
    base = cls.from_yaml(args.config) if getattr(args, "config", None) else cls()
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return base.replace(**overrides) if overrides else base


def add_section_flags(parser: argparse.ArgumentParser, cls, section: str) -> None:
    """One `--field-name` flag per field of the config section `section` (of type `cls`), each with its help and
    default, overriding `section.field` of `--config` (`from_flags` reads them back). A field's metadata may name
    another spelling ("flag"). A bool that defaults to false is a flag alone."""
    group = parser.add_argument_group(f"{section} settings (override the {section}: section of --config)")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t, meta = hints[f.name], f.metadata
        if t is bool and not f.default:
            extra = {"action": "store_const", "const": "true"}
        else:
            extra = {"metavar": _metavar(f, t)}
        group.add_argument(f"--{meta.get('flag', f.name.replace('_', '-'))}", dest=f"cfg:{section}.{f.name}",
                           default=None, help=f"{meta['help']} (default: {f.default})", **extra)


# one name per concept in every command: --runs (a folder of run folders), --input (a file of texts or rows),
# --output (what the command writes). Earlier spellings still work, hidden from --help, with a one-line notice.
class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"budgetlora: note: {option_string} is now {self.new}; the old spelling still works", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_flag(p: argparse.ArgumentParser, flag: str, *old: str, required: bool = False, **kwargs) -> None:
    """`flag`, and its earlier spellings `old` accepted as hidden aliases. A required flag is checked in `main`
    (argparse would refuse a command that gave only an old spelling)."""
    dest = flag.lstrip("-").replace("-", "_")
    p.add_argument(flag, dest=dest, **kwargs)
    for name in old:
        p.add_argument(name, dest=dest, action=_Renamed, new=flag, help=argparse.SUPPRESS)
    if required:
        p.set_defaults(_required=(p.get_default("_required") or ()) + (flag,))
