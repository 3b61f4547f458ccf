"""Typed configs: dataclasses whose fields carry their help text, loaded from YAML, overridden on the CLI.

Every field of a config becomes a command-line option named by its dotted path (`--dr2.weights`,
`--runtime.batch-size`), so `--help` documents the whole config and nothing is left YAML-only.
Values on the command line are parsed as YAML scalars/lists (`--dr2.N "[4, 8]"`, `--blur.sigma 0.5:3`).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


def opt(default: Any, help: str, **kw) -> Any:
    """A config field with its help text (shown by --help)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Sampled:
    """A per-sample parameter: fixed, drawn from a set, or drawn uniformly from [low, high].

    YAML: `4` (fixed), `[4, 8, 16]` (set), `{low: 0.5, high: 3.0}` (range); CLI: `4`, `4,8,16`, `0.5:3`.
    Integer ranges include both ends.
    """

    values: tuple = ()
    low: float | None = None
    high: float | None = None

    @classmethod
    def parse(cls, v: Any) -> Sampled:
        if isinstance(v, Sampled):
            return v
        if isinstance(v, str):
            v = v.strip()
            if ":" in v:
                lo, hi = v.split(":")
                v = {"low": yaml.safe_load(lo), "high": yaml.safe_load(hi)}
            elif "," in v:
                v = [yaml.safe_load(x) for x in v.strip("[]").split(",")]
            else:
                v = yaml.safe_load(v)
        if isinstance(v, dict):
            if set(v) != {"low", "high"} or v["low"] > v["high"]:
                raise ValueError(f"a range needs low <= high, got {v}")
            return cls(low=v["low"], high=v["high"])
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("an empty set of values")
            return cls(values=tuple(v))
        return cls(values=(v,))

    def draw(self, rng: random.Random) -> Any:
        if self.values:
            return self.values[0] if len(self.values) == 1 else rng.choice(self.values)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return rng.randint(self.low, self.high)
        return rng.uniform(float(self.low), float(self.high))

    def describe(self) -> Any:
        if self.values:
            return self.values[0] if len(self.values) == 1 else list(self.values)
        return {"low": self.low, "high": self.high}


def _is_section(tp: Any) -> bool:
    return is_dataclass(tp) and tp is not Sampled


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[f.name]


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if tp is Sampled:
        return Sampled.parse(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if _is_section(tp):
        return build(tp, value or {}, where)
    if tp is bool and isinstance(value, str):
        value = yaml.safe_load(value)
    if tp in (int, float, str, bool):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{where.rstrip('.')}: expected {tp.__name__}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [yaml.safe_load(x) for x in value.split(",")]
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where.rstrip('.')}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def build(cls: type, data: dict, where: str = "") -> Any:
    """Instantiate a config dataclass from nested dicts, rejecting unknown keys with their path."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(where + k for k in unknown)}; "
                         f"known: {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _coerce(_field_type(cls, f), data[name], f"{where}{name}.")
        elif _is_section(_field_type(cls, f)):
            kwargs[name] = build(_field_type(cls, f), {}, f"{where}{name}.")
    obj = cls(**kwargs)
    for name, f in known.items():
        tp = _field_type(cls, f)
        if tp is Sampled and not isinstance(getattr(obj, name), Sampled):
            object.__setattr__(obj, name, Sampled.parse(getattr(obj, name)))
    return obj


def to_dict(obj: Any) -> Any:
    if isinstance(obj, Sampled):
        return obj.describe()
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def shown_config(cfg: Any) -> dict:
    """The config as shown or hashed anywhere: secrets (storage-option credentials, URL userinfo) redacted."""
    from tasks.storage import redact

    return redact(to_dict(cfg))


def _walk(cls: type, prefix: str = ""):
    for f in fields(cls):
        tp = _field_type(cls, f)
        if _is_section(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _set_path(d: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if is_dataclass(v):
        return ""
    return f" (default: {to_dict(v)!r})" if not isinstance(v, Sampled) else f" (default: {v.describe()!r})"


def make_parser(cls: type, description: str, default_config: Path | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=default_config,
                   help=f"YAML config file; command-line options override it (default: {default_config})")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, f, tp in _walk(cls):
        section = path.rsplit(".", 1)[0] if "." in path else "job"
        g = groups.get(section) or groups.setdefault(section, p.add_argument_group(section))
        names = [f"--{path.replace('_', '-')}"]
        if f.metadata.get("flag"):
            names.append(f.metadata["flag"])
        kind = "true/false" if tp is bool else ("VALUE|A,B|LO:HI" if tp is Sampled else "VALUE")
        g.add_argument(*names, dest=path, metavar=kind, default=argparse.SUPPRESS,
                       help=f.metadata.get("help", "") + _default_repr(f))
    return p


def load(cls: type, argv: list[str] | None, description: str, default_config: Path | None = None):
    """Parse argv: --config YAML, then dotted overrides. Returns the config instance."""
    parser = make_parser(cls, description, default_config)
    ns = vars(parser.parse_args(argv))
    cfg_path = ns.pop("config")
    print_only = ns.pop("print_config")
    data: dict = {}
    if cfg_path:
        data = yaml.safe_load(Path(cfg_path).read_text()) or {}
    types_ = {path: tp for path, _, tp in _walk(cls)}
    for path, value in ns.items():
        tp = types_[path]
        # Strings stay strings (paths like "001"); other values are YAML scalars/lists.
        if tp is not str and tp is not Sampled and typing.get_args(tp) != (str, type(None)):
            value = yaml.safe_load(value)
        _set_path(data, path, value)
    try:
        cfg = build(cls, data)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if print_only:
        print(yaml.safe_dump(shown_config(cfg), sort_keys=False))
        raise SystemExit(0)
    return cfg
