"""Checks of user-settable values, before any work starts: one ConfigError naming the key, the value and what
is allowed (the entry prints it as one `error:` line, exit 2).

- `check_field_types(obj, group)`: every field of a config dataclass against its annotation (`trainer.lr=abc`
  is a string where a number belongs), so the dataclasses' own range checks compare numbers with numbers;
- `did_you_mean(word, choices)`: the near-miss hint used for names (methods, tasks, keys).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError

# The configs ship inside the package (conf/ at the checkout root is a link to it), so an installed copy finds them
CONF_DIR = Path(__file__).resolve().parent / "conf"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, ignoring case, '-' vs '_' and a missing '_'; '' if none."""
    def norm(s: str) -> str:
        return s.lower().replace("-", "_")

    by_norm = {norm(c): c for c in choices}
    if norm(word) in by_norm:
        return f" (did you mean {by_norm[norm(word)]}?)"
    squashed = {k.replace("_", ""): v for k, v in by_norm.items()}
    if norm(word).replace("_", "") in squashed:
        return f" (did you mean {squashed[norm(word).replace('_', '')]}?)"
    close = difflib.get_close_matches(norm(word), list(by_norm), n=1, cutoff=0.75)
    return f" (did you mean {by_norm[close[0]]}?)" if close else ""


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, getattr(t, "__name__", str(t)))


def _accepts(t: Any, value: Any) -> bool:
    if t is Any:
        return True
    if t is type(None):
        return value is None
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(t))
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is dict:
        return isinstance(value, dict)
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, t) if isinstance(t, type) else True


def _describe(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(t) if a is not type(None)]
        text = " or ".join(_type_name(a) for a in parts)
        return text + (" or null" if len(parts) < len(typing.get_args(t)) else "")
    return _type_name(t)


def check_value(key: str, value: Any, expected: Any) -> None:
    if not _accepts(expected, value):
        raise ConfigError(f"{key}={value!r} is not valid: expected {_describe(expected)}")


def _coerced(expected: Any, value: Any) -> tuple[bool, Any]:
    """(True, v) when `value` stands for a value of `expected` in another form: an integral float for an int
    (`epochs=3.0`), a numeric string for a number and "true"/"false" for a bool (`${oc.env:LR}` gives strings)."""
    options = typing.get_args(expected) if typing.get_origin(expected) in (typing.Union, types.UnionType) \
        else (expected,)
    for t in options:
        if t is int and isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str) and t in (int, float):
            try:
                return True, t(value.strip())
            except ValueError:
                continue
        if t is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return True, value.strip().lower() == "true"
    return False, value


def check_field_types(obj: Any, group: str) -> None:
    """Check every field of dataclass `obj` against its annotation, converting values that only differ in form
    (see _coerced); raise ConfigError naming the first field that is not of its type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, expected = getattr(obj, f.name), hints.get(f.name, Any)
        if not _accepts(expected, value):
            ok, converted = _coerced(expected, value)
            if ok:
                object.__setattr__(obj, f.name, converted)  # frozen dataclasses too: this is their __post_init__
                continue
        check_value(f"{group}.{f.name}", value, expected)
