"""One config system for every job: YAML files checked against dataclass schemas at load time.

Errors name the file and the key path ("configs/encode.yaml: run.batch_size: expected int, got 'big'"),
unknown keys are refused with the closest allowed name, and a schema's own __post_init__ checks run too."""

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Hashable
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _convert(value, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin is typing.Literal:  # of the choice's type too: True == 1 and 2.0 == 2 in Python
        if not any(value == choice and type(value) is type(choice) for choice in args):
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else typing.Any
        return origin(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key, item = args or (typing.Any, typing.Any)
        return {_convert(k, key, f"{where} key {k!r}"): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint in (dict, list):
        if not isinstance(value, hint):
            raise ConfigError(f"{where}: expected a {'mapping' if hint is dict else 'list'}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):  # 1e999 reads as inf
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def from_dict(schema, data, where: str = "config"):
    """An instance of the dataclass `schema` from plain data, every field checked."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; allowed: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where != "config" else name
        if name in data:
            values[name] = _convert(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required")
    try:
        return schema(**values)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def parse_overrides(items: list[str] | None) -> dict:
    """`--set` items, "dotted.key=value", as load_config overrides; each value is read as YAML, so
    `phase1.steps=3` is an int, `phase1.mix=[2, 1]` a list and `model.backbone.path=x.pth` a string."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. phase1.steps=3")
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: {key.strip()!r} has an empty part between its dots")
        if key.strip() in overrides:  # as a YAML file's key given twice: the first would be dropped in silence
            raise ConfigError(f"--set {key.strip()} is given twice")
        try:
            overrides[key.strip()] = yaml.load(value, UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    return overrides


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping, which it would read as the last one alone
    (`run: {actors: 4}` then `run: {batch_size: 8}` silently dropped the actors), and reading `5e-4` as a number
    (YAML 1.2), not the string YAML 1.1 makes of an exponent without a dot or a sign."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by the base class
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable) or key in seen:
                why = f"the key {key!r} is given twice" if isinstance(key, Hashable) else f"{key!r} cannot be a key"
                raise yaml.constructor.ConstructorError(None, None, why, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


UniqueKeyLoader.add_implicit_resolver(  # copies the base class's table first: yaml.safe_load is left as it is
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def unshared(data):
    """`data` with no mapping or list in two places: YAML gives an anchor and its aliases (`audio: *image`, and
    what `<<: *defaults` merges) one object, so a `--set` of one would change the others too."""
    if isinstance(data, dict):
        return {key: unshared(value) for key, value in data.items()}
    if isinstance(data, list):
        return [unshared(value) for value in data]
    return data


def load_config(path, schema, overrides: dict | None = None):
    """The YAML file at `path` as a `schema` instance; `overrides` (dotted keys) win over the file."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:  # a folder, a file this user may not read
        raise ConfigError(f"{path}: cannot read it as a config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):  # before overrides go into it
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    if overrides:
        data = unshared(data)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:  # absent, or an empty section (`scaling:`)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):  # `--set scaling.workers.n=1`: workers is a number
                raise ConfigError(f"{path}: --set {dotted}: {'.'.join(parents[:i + 1])} is {node!r}, not a mapping")
        node[leaf] = value
    try:
        return from_dict(schema, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
