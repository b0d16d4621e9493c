"""The builtin functions: Go's text/template builtins and the sprig ones LocalAI templates call."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Final

from pylocalai.config._govalue import (
    GoStruct,
    StringMap,
    format_value,
    go_type,
    marshal_json,
    sprint,
    sprintf,
    sprintln,
)
from pylocalai.config.gotemplate._nodes import _NOFINAL, _ArgTypeError, _CallError, _Expr, _Func, _State


def _and(st: _State, dot: Any, operands: Sequence[_Expr], final: Any) -> Any:
    value = None
    for operand in operands:
        value = operand.arg(st, dot)
        if not value:
            return value
    return value if final is _NOFINAL else final


def _or(st: _State, dot: Any, operands: Sequence[_Expr], final: Any) -> Any:
    value = None
    for operand in operands:
        value = operand.arg(st, dot)
        if value:
            return value
    return value if final is _NOFINAL else final


def _kind(value: Any) -> str | None:
    """Go's basicKind: None for nil, "other" for what eq compares by identity of type."""
    if value is None:
        return None
    for kind, cls in (("bool", bool), ("int", int), ("float", float), ("string", str)):
        if isinstance(value, cls):
            return kind
    return "other"


def _eq(first: Any, *others: Any) -> bool:
    if not others:
        raise _CallError("missing argument for comparison")
    first_kind = _kind(first)
    for other in others:
        other_kind = _kind(other)
        if first_kind != other_kind:
            if first is not None and other is not None:
                raise _CallError("incompatible types for comparison")
        elif first_kind == "other" and not (
            isinstance(first, GoStruct) and isinstance(other, GoStruct) and first.type is other.type
        ):
            types = f"{format_value(first)}: {go_type(first)}, {go_type(other)}: {format_value(other)}"
            raise _CallError("non-comparable types " + types)
        elif first == other:
            return True
    return False


def _lt(a: Any, b: Any) -> bool:
    a_kind, b_kind = _kind(a), _kind(b)
    if a_kind in (None, "other", "bool") or b_kind in (None, "other", "bool"):
        raise _CallError("invalid type for comparison")
    if a_kind != b_kind:
        raise _CallError("incompatible types for comparison")
    return bool(a < b)


def _le(a: Any, b: Any) -> bool:
    return _lt(a, b) or _eq(a, b)


def _len(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    raise _CallError("len of nil pointer" if value is None else f"len of type {go_type(value)}")


def _index(item: Any, *keys: Any) -> Any:
    if item is None:
        raise _CallError("index of untyped nil")
    for key in keys:
        if item is None:
            raise _CallError("index of nil pointer")
        if isinstance(item, (list, tuple, str)):
            if key is None or isinstance(key, bool) or not isinstance(key, int):
                raise _CallError("cannot index slice/array with " + ("nil" if key is None else "type " + go_type(key)))
            items = item.encode() if isinstance(item, str) else item
            if not 0 <= key < len(items):
                raise _CallError(f"index out of range: {key}")
            item = items[key]
        elif isinstance(item, dict):
            if not isinstance(key, str):
                raise _CallError(f"value has type {go_type(key)}; should be string")
            item = item.get(key, "" if isinstance(item, StringMap) else None)
        else:
            raise _CallError(f"can't index item of type {go_type(item)}")
    return item


def _string(value: Any) -> str:
    """A string parameter of a Go function: anything else is refused before the call."""
    if isinstance(value, str):
        return value
    if value is None:
        raise _ArgTypeError("invalid value; expected string")
    raise _ArgTypeError(f"wrong type for value; expected string; got {go_type(value)}")


def _to_json(value: Any) -> str:
    try:
        return marshal_json(value)
    except ValueError:
        return ""  # sprig's toJson drops json.Marshal's error


def _add1(value: Any) -> int:
    """sprig add1 = cast.ToInt64(value) + 1; what cast cannot read counts as 0."""
    if isinstance(value, (bool, int)):
        return int(value) + 1
    if isinstance(value, float):
        return (int(value) if math.isfinite(value) else 0) + 1
    if isinstance(value, str):
        try:
            return int(re.sub(r"\.0*$", "", value), 0) + 1
        except ValueError:
            return 1
    return 1


def _to_string(value: Any) -> str:
    return value if isinstance(value, str) else format_value(value)


def _join(sep: Any, items: Any) -> str:
    if items is None:
        parts: list[str] = []
    elif isinstance(items, (list, tuple)):
        parts = [_to_string(item) for item in items if item is not None]
    else:
        parts = [_to_string(items)]
    return _string(sep).join(parts)


def _default(fallback: Any, *given: Any) -> Any:
    return given[0] if given and given[0] else fallback


_FUNCS: Final[dict[str, _Func]] = {
    "and": _Func(_and, 1, lazy=True),
    "or": _Func(_or, 1, lazy=True),
    "not": _Func(lambda value: not value, 1, 1),
    "len": _Func(_len, 1, 1),
    "index": _Func(_index, 1),
    "print": _Func(lambda *args: sprint(args), 0),
    "println": _Func(lambda *args: sprintln(args), 0),
    "printf": _Func(lambda fmt, *args: sprintf(_string(fmt), args), 1),
    "eq": _Func(_eq, 1),
    "ne": _Func(lambda a, b: not _eq(a, b), 2, 2),
    "lt": _Func(_lt, 2, 2),
    "le": _Func(_le, 2, 2),
    "gt": _Func(lambda a, b: not _le(a, b), 2, 2),
    "ge": _Func(lambda a, b: not _lt(a, b), 2, 2),
    "toJson": _Func(_to_json, 1, 1),
    "add1": _Func(_add1, 1, 1),
    "trim": _Func(lambda s: _string(s).strip(), 1, 1),
    "upper": _Func(lambda s: _string(s).upper(), 1, 1),
    "lower": _Func(lambda s: _string(s).lower(), 1, 1),
    "contains": _Func(lambda sub, s: _string(sub) in _string(s), 2, 2),
    "hasPrefix": _Func(lambda prefix, s: _string(s).startswith(_string(prefix)), 2, 2),
    "hasSuffix": _Func(lambda suffix, s: _string(s).endswith(_string(suffix)), 2, 2),
    "replace": _Func(lambda old, new, s: _string(s).replace(_string(old), _string(new)), 3, 3),
    "join": _Func(_join, 2, 2),
    "default": _Func(_default, 1),
    "empty": _Func(lambda value: not value, 1, 1),
    "toString": _Func(_to_string, 1, 1),
}
