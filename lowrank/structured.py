"""Dataclass configs from plain mappings (YAML, OmegaConf containers, dicts), with errors people can act on.

:func:`from_mapping` builds a (possibly nested) dataclass, and for the first problem it meets raises a ValueError
that names the full key (``optimizer.lowrank.rank``), and either the key's new place (for a key listed in the
dataclass's ``MOVED_KEYS``), the full key of a wrongly nested one (``lowrank.rank`` given at the top: the known keys
anywhere in the schema built by the outermost call that end with the same dotted suffix, ``optimizer.lowrank.rank``),
the closest accepted key (for a typo), or the expected type (for a wrong type). Semantic checks (ranges, choices) are
the dataclasses' own ``validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

# The dataclass (and its key prefix) that the outermost `from_mapping` call builds: where a wrongly nested key is
# looked up.
_Root = tuple[type, str]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, root: _Root | None = None) -> Any:
    """``value`` checked against annotation ``tp`` (ints are accepted where floats are expected)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key, root)
            except ValueError as err:
                errors.append(err)
        raise errors[0] if errors else ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}"
            )
        return _build(tp, value, key, root or (tp, key))
    if origin in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]", root) for i, (v, a) in enumerate(zip(items, args)))
        inner = args[0] if args else Any
        coerced = [_coerce(v, inner, f"{key}[{i}]", root) for i, v in enumerate(items)]
        return tuple(coerced) if origin is tuple else coerced
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            accepted = " | ".join(map(str, typing.get_args(tp)))
            raise ValueError(f"{key}: invalid value {value!r}; accepted: {accepted}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ValueError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _raise_if_moved(cls: type, key: str, value: Any, full: str) -> None:
    """A key that an older version accepted (listed in ``cls.MOVED_KEYS``, ``"key"`` or ``"section.key"``) gets a
    message naming its new place instead of "unknown key"."""
    moved: dict[str, str] = getattr(cls, "MOVED_KEYS", {})
    if key in moved:
        raise ValueError(f"{full}: moved to {moved[key]}")
    inner = [
        f"{full}.{sub}: moved to {moved[f'{key}.{sub}']}"
        for sub in (value if isinstance(value, Mapping) else ())
        if f"{key}.{sub}" in moved
    ]
    if inner:
        raise ValueError("; ".join(inner))


def _dataclasses_in(tp: Any) -> list[type]:
    """The dataclasses an annotation holds: itself, or the dataclass options of a union (``X | None``)."""
    if dataclasses.is_dataclass(tp):
        return [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [option for option in typing.get_args(tp) if dataclasses.is_dataclass(option)]
    return []


def _schema_keys(cls: type, prefix: str) -> list[str]:
    """Every dotted key of dataclass ``cls`` under ``prefix``, sections and the keys of nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        full = f"{prefix}.{f.name}" if prefix else f.name
        keys.append(full)
        for inner in _dataclasses_in(hints[f.name]):
            keys += _schema_keys(inner, full)
    return keys


def _dotted(key: str, value: Any) -> list[str]:
    """The dotted leaf keys an entry spells: ``lowrank: {rank: 4}`` gives ``lowrank.rank``; a scalar, its key."""
    if isinstance(value, Mapping) and value:
        return [leaf for sub, inner in value.items() for leaf in _dotted(f"{key}.{sub}", inner)]
    return [key]


def _placed_elsewhere(root: _Root, key: str, value: Any) -> list[str]:
    """Known keys of the root schema that end with a dotted suffix of the unknown entry's leaf keys (the longest
    suffix that matches: ``lowrank.rank``, else ``rank``), else with its key alone: where a wrongly nested key
    belongs. At most three, the shallowest first."""
    known = _schema_keys(*root)
    leaves = [leaf.split(".") for leaf in _dotted(key, value)]
    longest = max(len(parts) for parts in leaves)
    candidates = [[".".join(p[-n:]) for p in leaves if len(p) >= n] for n in range(longest, 0, -1)]
    for suffixes in (*candidates, [key]):
        found = [k for k in known if any(k == s or k.endswith(f".{s}") for s in suffixes)]
        if found:
            return sorted(found, key=lambda k: k.count("."))[:3]
    return []


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Builds dataclass ``cls`` from ``data``; keys absent from ``data`` keep their defaults."""
    return _build(cls, data, prefix, (cls, prefix))


def _build(cls: type, data: Mapping[str, Any], prefix: str, root: _Root) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields or not fields[key].init:
            _raise_if_moved(cls, key, value, full)
            elsewhere = _placed_elsewhere(root, str(key), value)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            if elsewhere:
                options = ", ".join(elsewhere[:-1]) + " or " if len(elsewhere) > 1 else ""
                hint = f" (did you mean {options}{elsewhere[-1]}?)"
            else:
                hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ValueError(f"unknown key {full}{hint}; accepted: {', '.join(fields)}")
        values[key] = _coerce(value, hints[key], full, root)
    missing = [
        name
        for name, f in fields.items()
        if f.init
        and name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(f"{prefix}.{name}" if prefix else name for name in missing)
        raise ValueError(f"missing key(s) {keys}; {prefix or 'the config'} needs: {', '.join(fields)}")
    try:
        return cls(**values)
    except ValueError as err:  # the dataclass's own checks (__post_init__): say which section they are about
        raise ValueError(f"{prefix}: {err}" if prefix else str(err)) from None
