"""Go's text/template, the subset LocalAI's prompt templates use, interpreted in pure Python.

Template.parse lexes and parses once and fails with TemplateError("template: NAME:LINE:COL: ...");
render() walks the node tree over the data and fails in Go's execution-error shape. Columns count
bytes from 0, as Go's do. How Python values stand for Go ones (structs, nil, maps) is in _govalue.

Semantics follow Go 1.19: truthiness; and/or return an operand and stop at the first deciding one;
eq takes several operands and refuses int against float; index gives the zero value for a missing
key; `.Key` of a missing map key prints "<no value>" while an unknown struct field is an error; a
variable declared inside if/range/with ends at its {{end}} and `=` assigns to the visible one; range
walks maps in sorted key order; `{{- ` and ` -}}` trim all adjacent whitespace. Not supported:
define/template/block, break/continue, and builtins no LocalAI template calls (html, js, urlquery,
slice, call). Variables resolve to frame slots at parse time: sound, as nothing recurses.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pylocalai.config._govalue import (
    GoStruct,
    StringMap,
    chat_message_data,
    format_value,
    go_quote,
    go_type,
    marshal_json,
    multimodal_data,
    prompt_data,
    sprint,
    sprintf,
    sprintln,
)
from pylocalai.errors import InvalidRequestError

__all__ = ["Template", "TemplateError", "chat_message_data", "multimodal_data", "prompt_data", "render"]


class TemplateError(InvalidRequestError):
    """A template that does not parse, or fails while executing; the message names NAME:LINE:COL."""

    def __init__(self, message: str, *, name: str, line: int, col: int) -> None:
        super().__init__(message)
        self.name = name
        self.line = line
        self.col = col


class _ParseError(Exception):
    def __init__(self, pos: int, message: str) -> None:
        super().__init__(message)
        self.pos = pos


class _ExecError(Exception):
    def __init__(self, node: _Expr | _Command | _Node, message: str) -> None:
        super().__init__(message)
        self.node = node


class _CallError(Exception):
    """Raised by a template function; reported as 'error calling NAME: ...'."""


class _ArgTypeError(Exception):
    """An argument Go refuses before calling the function; reported as it is."""


# ---- lexer ----------------------------------------------------------------------------------------

_Token = tuple[str, str, int]  # kind, source text, offset in the template
_SPACES: Final = frozenset(" \t\r\n")
_TERMINATORS: Final = frozenset(" \t\r\n.,|:()")
_KEYWORDS: Final = frozenset({"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"})
_OPS: Final = {"=": "assign", "(": "lparen", ")": "rparen", ",": "comma", "|": "pipe"}
_UNTERMINATED: Final = {
    '"': "unterminated quoted string",
    "`": "unterminated raw quoted string",
    "'": "unterminated character constant",
}
_TOKEN: Final = re.compile(
    r"""(?P<space>[ \t\r\n]+)
    |(?P<number>[+-]?(?:0[xX][0-9a-fA-F_]*(?:\.[0-9a-fA-F_]*)?(?:[pP][+-]?[0-9_]+)?|0[oObB][0-9_]+
        |(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9_]+)?))
    |(?P<field>\.\w*)
    |(?P<var>\$\w*)
    |(?P<string>"(?:[^"\\\n]|\\.)*")
    |(?P<raw>`[^`]*`)
    |(?P<char>'(?:[^'\\\n]|\\.)*')
    |(?P<ident>[^\W\d]\w*)
    |(?P<declare>:=)
    |(?P<op>[=(),|])""",
    re.X,
)


def _right_delim(text: str, pos: int) -> tuple[int, bool] | None:
    """Where an action closing at `pos` ends and whether it trims: `}}`, or one space then `-}}`."""
    if text.startswith("}}", pos):
        return pos + 2, False
    if text[pos : pos + 1] in _SPACES and text.startswith("-}}", pos + 1):
        return pos + 4, True
    return None


def _lex(text: str) -> list[tuple[str, Any, int]]:
    """("text", str, offset) and ("action", tokens, offset of its `{{`) items; comments dropped and
    trim markers applied. An action's tokens end with an "eof" token at its closing delimiter."""
    items: list[tuple[str, Any, int]] = []
    pos = 0
    trim_next = False
    while True:
        start = text.find("{{", pos)
        stop = len(text) if start < 0 else start
        trim_before = start >= 0 and text.startswith("-", start + 2) and text[start + 3 : start + 4] in _SPACES
        chunk_pos, chunk = pos, text[pos:stop]
        if trim_next:
            kept = chunk.lstrip(" \t\r\n")
            chunk_pos += len(chunk) - len(kept)
            chunk = kept
        if trim_before:
            chunk = chunk.rstrip(" \t\r\n")
        if chunk:
            items.append(("text", chunk, chunk_pos))
        if start < 0:
            return items
        inner = start + (4 if trim_before else 2)
        if text.startswith("/*", inner):
            close = text.find("*/", inner + 2)
            if close < 0:
                raise _ParseError(start, "unclosed comment")
            delim = _right_delim(text, close + 2)
            if delim is None:
                raise _ParseError(close + 2, "comment ends before closing delimiter")
            pos, trim_next = delim
        else:
            tokens, pos, trim_next = _lex_action(text, inner, start)
            items.append(("action", tokens, start))


def _lex_action(text: str, pos: int, start: int) -> tuple[list[_Token], int, bool]:
    tokens: list[_Token] = []
    depth = 0
    match = _TOKEN.match
    while True:
        if text.startswith("}}", pos):
            close, end, trim = pos, pos + 2, False
            break
        found = match(text, pos)
        if found is None:
            if pos >= len(text):
                raise _ParseError(start, "unclosed action")
            char = text[pos]
            message = _UNTERMINATED.get(char) or "unrecognized character in action: " + go_quote(char, "'")
            raise _ParseError(pos, message)
        kind, value, end = found.lastgroup or "", found.group(), found.end()
        if kind == "space" and text.startswith("-}}", end):
            if end - 1 > pos:
                tokens.append(("space", value[:-1], pos))
            close, end, trim = end - 1, end + 3, True
            break
        if kind in ("field", "var", "ident"):
            if end < len(text) and text[end] not in _TERMINATORS and not text.startswith("}}", end):
                raise _ParseError(end, "bad character " + go_quote(text[end], "'"))
            if kind == "field" and value == ".":
                kind = "dot"
            elif kind == "ident" and value in _KEYWORDS:
                kind = "keyword"
            elif kind == "ident" and value in ("true", "false", "nil"):
                kind = "nil" if value == "nil" else "bool"
        elif kind == "number" and end < len(text) and (text[end].isalnum() or text[end] == "_"):
            raise _ParseError(pos, "bad number syntax: " + go_quote(text[pos : end + 1]))
        elif kind == "op":
            kind = _OPS[value]
            depth += (kind == "lparen") - (kind == "rparen")
            if depth < 0:
                raise _ParseError(pos, "unexpected right paren")
        tokens.append((kind, value, pos))
        pos = end
    if depth:
        raise _ParseError(close, "unclosed left paren")
    tokens.append(("eof", "", close))
    return tokens, end, trim


_ESCAPE: Final = re.compile(r"\\(?:([abfnrtv\\'\"])|x([0-9a-fA-F]{2})|([0-7]{3})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
_SIMPLE_ESCAPES: Final = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"} | {
    c: c for c in "\\'\""
}


def _unquote(token: str, pos: int) -> str:
    """strconv.Unquote of a "quoted", `raw` or 'c' literal (\\x and octal escapes are bytes, as in Go)."""
    if token[0] == "`":
        return token[1:-1].replace("\r", "")
    body = token[1:-1]
    if "\\" not in body:
        return body
    out = bytearray()
    i = 0
    while (j := body.find("\\", i)) >= 0:
        out += body[i:j].encode()
        escape = _ESCAPE.match(body, j)
        if escape is None:
            raise _ParseError(pos, "invalid syntax in " + token)
        simple, hex_byte, octal, short, long = escape.groups()
        if simple:
            out += _SIMPLE_ESCAPES[simple].encode()
        elif hex_byte or (octal and int(octal, 8) < 256):
            out.append(int(hex_byte, 16) if hex_byte else int(octal, 8))
        elif (short or long) and (code := int(short or long, 16)) <= 0x10FFFF and not 0xD800 <= code < 0xE000:
            out += chr(code).encode()
        else:
            raise _ParseError(pos, "invalid syntax in " + token)
        i = escape.end()
    out += body[i:].encode()
    return out.decode("utf-8", "replace")


def _number(kind: str, text: str, pos: int) -> int | float:
    """A numeric or character constant: an int unless written with a point or an exponent."""
    if kind == "char":
        char = _unquote(text, pos)
        if len(char) != 1:
            raise _ParseError(pos, "malformed character constant: " + text)
        return ord(char)
    digits = text.lower().lstrip("+-")
    try:
        if digits.startswith(("0o", "0b")) or (digits.startswith("0x") and not ("." in digits or "p" in digits)):
            return int(text, 0)
        if digits.startswith("0x"):
            return float.fromhex(text)
        if "." in digits or "e" in digits:
            return float(text)
        return int(text, 8 if len(digits) > 1 and digits[0] == "0" else 10)
    except ValueError:
        raise _ParseError(pos, "illegal number syntax: " + go_quote(text)) from None


# ---- nodes and their evaluation -------------------------------------------------------------------

_NOFINAL: Final = object()  # nothing piped into a command (Go's missingVal)
_MISSING: Final = object()  # a map key that is not there (Go's invalid reflect.Value)
_UNSET: Final = object()  # a variable slot not assigned yet


class _State:
    """One render: the output pieces and the variable frame (slot 0 is `$`)."""

    __slots__ = ("out", "vars")

    def __init__(self, n_slots: int, data: Any) -> None:
        self.out: list[str] = []
        self.vars: list[Any] = [_UNSET] * n_slots
        self.vars[0] = data


class _Expr:
    """An operand: evaluated as an argument (arg) or as the first word of a command (call)."""

    __slots__ = ("pos",)

    def __init__(self, pos: int) -> None:
        self.pos = pos

    def arg(self, st: _State, dot: Any) -> Any:
        raise NotImplementedError

    def call(self, st: _State, dot: Any, cmd: _Command, final: Any) -> Any:
        if cmd.rest or final is not _NOFINAL:
            raise _ExecError(self, f"can't give argument to non-function {self}")
        return self.arg(st, dot)


class _Literal(_Expr):
    """A bool, number or string constant."""

    __slots__ = ("text", "value")

    def __init__(self, value: Any, text: str, pos: int) -> None:
        super().__init__(pos)
        self.value = value
        self.text = text

    def arg(self, st: _State, dot: Any) -> Any:
        return self.value

    def __str__(self) -> str:
        return self.text


class _Dot(_Expr):
    __slots__ = ()

    def arg(self, st: _State, dot: Any) -> Any:
        return dot

    def __str__(self) -> str:
        return "."


class _Nil(_Expr):
    __slots__ = ()

    def arg(self, st: _State, dot: Any) -> Any:
        return None

    def call(self, st: _State, dot: Any, cmd: _Command, final: Any) -> Any:
        raise _ExecError(self, "nil is not a command")

    def __str__(self) -> str:
        return "nil"


def _field_chain(node: _Expr, receiver: Any, names: tuple[str, ...], has_args: bool) -> Any:
    """Go's evalFieldChain: struct fields must exist; a missing map key ends the chain as nil."""
    args_at = len(names) - 1 if has_args else -1
    for i, name in enumerate(names):
        if receiver.__class__ is GoStruct:
            value = receiver.values.get(name, _MISSING)
            if value is _MISSING:
                raise _ExecError(node, f"can't evaluate field {name} in type {receiver.type.name}")
            if i == args_at:
                raise _ExecError(node, f"{name} has arguments but cannot be invoked as function")
            receiver = value
        elif isinstance(receiver, dict):
            if i == args_at:
                raise _ExecError(node, f"{name} is not a method but has arguments")
            receiver = receiver.get(name, _MISSING)
            if receiver is _MISSING:
                return None
        elif receiver is None:
            raise _ExecError(node, f"nil pointer evaluating interface {{}}.{name}")
        else:
            raise _ExecError(node, f"can't evaluate field {name} in type {go_type(receiver)}")
    return receiver


class _Field(_Expr):
    __slots__ = ("names",)

    def __init__(self, names: tuple[str, ...], pos: int) -> None:
        super().__init__(pos)
        self.names = names

    def arg(self, st: _State, dot: Any) -> Any:
        return _field_chain(self, dot, self.names, False)

    def call(self, st: _State, dot: Any, cmd: _Command, final: Any) -> Any:
        return _field_chain(self, dot, self.names, bool(cmd.rest) or final is not _NOFINAL)

    def __str__(self) -> str:
        return "." + ".".join(self.names)


class _Variable(_Expr):
    __slots__ = ("name", "names", "slot")

    def __init__(self, slot: int, name: str, names: tuple[str, ...], pos: int) -> None:
        super().__init__(pos)
        self.slot = slot
        self.name = name
        self.names = names

    def _value(self, st: _State) -> Any:
        value = st.vars[self.slot]
        if value is _UNSET:
            raise _ExecError(self, f"undefined variable: {self.name}")
        return value

    def arg(self, st: _State, dot: Any) -> Any:
        value = self._value(st)
        return _field_chain(self, value, self.names, False) if self.names else value

    def call(self, st: _State, dot: Any, cmd: _Command, final: Any) -> Any:
        if not self.names:
            return super().call(st, dot, cmd, final)
        return _field_chain(self, self._value(st), self.names, bool(cmd.rest) or final is not _NOFINAL)

    def __str__(self) -> str:
        return self.name + "".join("." + name for name in self.names)


class _Chain(_Expr):
    """Fields of a parenthesised pipeline or function result: `(index .M "k").Name`."""

    __slots__ = ("names", "node")

    def __init__(self, node: _Expr, names: tuple[str, ...], pos: int) -> None:
        super().__init__(pos)
        self.node = node
        self.names = names

    def arg(self, st: _State, dot: Any) -> Any:
        return _field_chain(self, self.node.arg(st, dot), self.names, False)

    def call(self, st: _State, dot: Any, cmd: _Command, final: Any) -> Any:
        has_args = bool(cmd.rest) or final is not _NOFINAL
        return _field_chain(self, self.node.arg(st, dot), self.names, has_args)

    def __str__(self) -> str:
        head = f"({self.node})" if isinstance(self.node, _Pipe) else str(self.node)
        return head + "".join("." + name for name in self.names)


@dataclass(frozen=True, slots=True)
class _Func:
    impl: Callable[..., Any]
    min_args: int
    max_args: int | None = None  # None: variadic
    lazy: bool = False  # impl(st, dot, operands, final) evaluates its own operands (and, or)


class _Ident(_Expr):
    """A function name: called with the rest of the command, or with no arguments as an operand."""

    __slots__ = ("func", "name")

    def __init__(self, name: str, func: _Func, pos: int) -> None:
        super().__init__(pos)
        self.name = name
        self.func = func

    def arg(self, st: _State, dot: Any) -> Any:
        return self._invoke(st, dot, self, (), _NOFINAL)

    def call(self, st: _State, dot: Any, cmd: _Command, final: Any) -> Any:
        return self._invoke(st, dot, cmd, cmd.rest, final)

    def _invoke(self, st: _State, dot: Any, at: _Expr | _Command, operands: Sequence[_Expr], final: Any) -> Any:
        func = self.func
        count = len(operands) + (final is not _NOFINAL)
        if count < func.min_args or (func.max_args is not None and count > func.max_args):
            want = f"at least {func.min_args}" if func.max_args is None else str(func.max_args)
            raise _ExecError(at, f"wrong number of args for {self.name}: want {want} got {count}")
        try:
            if func.lazy:
                return func.impl(st, dot, operands, final)
            args = [operand.arg(st, dot) for operand in operands]
            if final is not _NOFINAL:
                args.append(final)
            return func.impl(*args)
        except _CallError as exc:
            raise _ExecError(at, f"error calling {self.name}: {exc}") from None
        except _ArgTypeError as exc:
            raise _ExecError(at, str(exc)) from None

    def __str__(self) -> str:
        return self.name


class _Command:
    __slots__ = ("args", "head", "pos", "rest")

    def __init__(self, args: tuple[_Expr, ...], pos: int) -> None:
        self.args = args
        self.head = args[0]
        self.rest = args[1:]
        self.pos = pos

    def __str__(self) -> str:
        return " ".join(f"({arg})" if isinstance(arg, _Pipe) else str(arg) for arg in self.args)


class _Pipe(_Expr):
    """`[$x :=] cmd | cmd ...`: each command gets the previous result as its last argument."""

    __slots__ = ("cmds", "decl_names", "slots")

    def __init__(
        self, cmds: tuple[_Command, ...], slots: tuple[int, ...], decl_names: tuple[str, ...], pos: int
    ) -> None:
        super().__init__(pos)
        self.cmds = cmds
        self.slots = slots
        self.decl_names = decl_names

    def arg(self, st: _State, dot: Any) -> Any:
        value = _NOFINAL
        for cmd in self.cmds:
            value = cmd.head.call(st, dot, cmd, value)
        for slot in self.slots:
            st.vars[slot] = value
        return value

    def __str__(self) -> str:
        decl = ", ".join(self.decl_names) + " := " if self.decl_names else ""
        return decl + " | ".join(str(cmd) for cmd in self.cmds)


class _Node:
    """A statement: text, an action, or a control structure."""

    __slots__ = ("pos",)

    def exec(self, st: _State, dot: Any) -> None:
        raise NotImplementedError


def _walk(nodes: tuple[_Node, ...], st: _State, dot: Any) -> None:
    for node in nodes:
        node.exec(st, dot)


class _Text(_Node):
    __slots__ = ("text",)

    def __init__(self, text: str, pos: int) -> None:
        self.pos = pos
        self.text = text

    def exec(self, st: _State, dot: Any) -> None:
        st.out.append(self.text)


class _Action(_Node):
    __slots__ = ("pipe",)

    def __init__(self, pipe: _Pipe, pos: int) -> None:
        self.pos = pos
        self.pipe = pipe

    def exec(self, st: _State, dot: Any) -> None:
        value = self.pipe.arg(st, dot)
        if not self.pipe.slots:  # an action that declares or assigns prints nothing
            st.out.append(value if value.__class__ is str else "<no value>" if value is None else format_value(value))


class _Control(_Node):
    __slots__ = ("body", "else_body", "pipe")

    def __init__(self, pipe: _Pipe, body: tuple[_Node, ...], else_body: tuple[_Node, ...], pos: int) -> None:
        self.pos = pos
        self.pipe = pipe
        self.body = body
        self.else_body = else_body


class _If(_Control):
    __slots__ = ()

    def exec(self, st: _State, dot: Any) -> None:
        _walk(self.body if self.pipe.arg(st, dot) else self.else_body, st, dot)


class _With(_Control):
    __slots__ = ()

    def exec(self, st: _State, dot: Any) -> None:
        value = self.pipe.arg(st, dot)
        if value:
            _walk(self.body, st, value)
        else:
            _walk(self.else_body, st, dot)


class _Range(_Control):
    __slots__ = ()

    def exec(self, st: _State, dot: Any) -> None:
        value = self.pipe.arg(st, dot)
        if isinstance(value, (list, tuple)):
            pairs: Any = enumerate(value)
        elif isinstance(value, dict):
            pairs = ((key, value[key]) for key in sorted(value))
        elif value is not None:
            raise _ExecError(self, f"range can't iterate over {format_value(value)}")
        if not value:
            _walk(self.else_body, st, dot)
            return
        slots = self.pipe.slots
        frame = st.vars
        for key, elem in pairs:
            if slots:
                frame[slots[-1]] = elem
                if len(slots) == 2:
                    frame[slots[0]] = key
            _walk(self.body, st, elem)

    def __str__(self) -> str:
        return f"{{{{range {self.pipe}}}}}"


# ---- functions ------------------------------------------------------------------------------------


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


# ---- parser ---------------------------------------------------------------------------------------

_OPERAND_START: Final = frozenset(
    {"bool", "char", "dot", "field", "ident", "lparen", "nil", "number", "raw", "string", "var"}
)


def _describe(token: _Token) -> str:
    kind, value, _ = token
    if kind == "eof":
        return '"}}"'
    return f"<{value}>" if kind == "keyword" else go_quote(value)


class _Parser:
    """Recursive descent over the lexed items, as Go's parse.Tree: an action at a time, tracking the
    variables in scope and giving each declaration its own frame slot."""

    def __init__(self, text: str) -> None:
        self.items = _lex(text)
        self.k = 0  # next item
        self.toks: list[_Token] = []  # the current action's tokens
        self.i = 0  # next token
        self.action_pos = 0
        self.scope: list[tuple[str, int]] = [("$", 0)]
        self.n_slots = 1

    def parse(self) -> tuple[_Node, ...]:
        nodes, stop = self._item_list()
        if stop != "eof":
            raise _ParseError(self.action_pos, f"unexpected {{{{{stop}}}}}")
        return nodes

    def _peek_ns(self) -> _Token:
        toks, i = self.toks, self.i
        while toks[i][0] == "space":
            i += 1
        self.i = i
        return toks[i]

    def _expect_end(self, context: str) -> None:
        token = self._peek_ns()
        if token[0] != "eof":
            raise _ParseError(token[2], f"unexpected {_describe(token)} in {context}")

    def _item_list(self) -> tuple[tuple[_Node, ...], str]:
        """Nodes up to {{end}}, {{else}} or the end of input, and which of the three stopped them."""
        nodes: list[_Node] = []
        while self.k < len(self.items):
            kind, value, pos = self.items[self.k]
            self.k += 1
            if kind == "text":
                nodes.append(_Text(value, pos))
                continue
            self.toks, self.i, self.action_pos = value, 0, pos
            token = self._peek_ns()
            if token[0] != "keyword":
                nodes.append(_Action(self._pipeline("command", "eof"), pos))
                continue
            self.i += 1
            word = token[1]
            if word in ("end", "else"):
                if word == "end":
                    self._expect_end("end")
                return tuple(nodes), word
            if word not in ("if", "range", "with"):
                raise _ParseError(token[2], f"{{{{{word}}}}} is not supported")
            nodes.append(self._control(word, token[2]))
        return tuple(nodes), "eof"

    def _control(self, word: str, pos: int) -> _Control:
        mark = len(self.scope)
        pipe = self._pipeline(word, "eof")
        body, stop = self._item_list()
        else_body: tuple[_Node, ...] = ()
        if stop == "else":
            token = self._peek_ns()
            if word == "if" and token[:2] == ("keyword", "if"):
                self.i += 1
                else_body = (self._control("if", token[2]),)  # {{else if}} shares the outer {{end}}
            else:
                self._expect_end("else")
                else_body, stop = self._item_list()
                if stop == "else":
                    raise _ParseError(self.action_pos, "expected end; found {{else}}")
        if stop == "eof":
            raise _ParseError(pos, f"unexpected EOF: {{{{{word}}}}} has no {{{{end}}}}")
        del self.scope[mark:]
        node_type = _If if word == "if" else _With if word == "with" else _Range
        return node_type(pipe, body, else_body, pipe.pos)

    def _lookup(self, name: str, pos: int) -> int:
        for declared, slot in reversed(self.scope):
            if declared == name:
                return slot
        raise _ParseError(pos, f"undefined variable {go_quote(name)}")

    def _declarations(self, context: str) -> tuple[list[_Token], bool]:
        """`$x :=`, `$x =` or (range only) `$i, $e :=` opening a pipeline; else nothing is consumed."""
        first = self._peek_ns()
        if first[0] != "var":
            return [], False
        start = self.i
        self.i += 1
        after = self._peek_ns()
        if after[0] in ("declare", "assign"):
            self.i += 1
            return [first], after[0] == "assign"
        if after[0] != "comma":
            self.i = start
            return [], False
        if context != "range":
            raise _ParseError(after[2], f"too many declarations in {context}")
        self.i += 1
        second = self._peek_ns()
        self.i += 1
        operator = self._peek_ns()
        if second[0] != "var" or operator[0] not in ("declare", "assign"):
            raise _ParseError(second[2], "range can only initialize variables")
        self.i += 1
        return [first, second], operator[0] == "assign"

    def _pipeline(self, context: str, end: str) -> _Pipe:
        pos = self._peek_ns()[2]
        declared, assign = self._declarations(context)
        slots = [self._lookup(name, at) for _, name, at in declared] if assign else []
        cmds: list[_Command] = []
        while (token := self._peek_ns())[0] != end:
            if token[0] not in _OPERAND_START:
                raise _ParseError(token[2], f"unexpected {_describe(token)} in {context}")
            cmds.append(self._command())
        if end == "rparen":
            self.i += 1
        if not cmds:
            raise _ParseError(pos, f"missing value for {context}")
        for stage, cmd in enumerate(cmds[1:], start=2):
            if isinstance(cmd.head, (_Literal, _Dot, _Nil)):
                raise _ParseError(cmd.pos, f"non executable command in pipeline stage {stage}")
        if not assign:  # declared after the commands: `$x := $x` reads the outer $x
            for _, name, _ in declared:
                self.scope.append((name, self.n_slots))
                slots.append(self.n_slots)
                self.n_slots += 1
        return _Pipe(tuple(cmds), tuple(slots), tuple(name for _, name, _ in declared), pos)

    def _command(self) -> _Command:
        pos = self._peek_ns()[2]
        args: list[_Expr] = []
        while True:
            operand = self._operand()
            if operand is not None:
                args.append(operand)
            kind, _, at = token = self.toks[self.i]
            if kind == "space":
                self.i += 1
                continue
            if kind == "pipe":
                self.i += 1
            elif kind not in ("eof", "rparen"):
                raise _ParseError(at, f"unexpected {_describe(token)} in operand")
            break
        if not args:
            raise _ParseError(pos, "empty command")
        return _Command(tuple(args), pos)

    def _operand(self) -> _Expr | None:
        node = self._term()
        if node is None or self.toks[self.i][0] != "field":
            return node
        pos = self.toks[self.i][2]
        names: list[str] = []
        while self.toks[self.i][0] == "field":
            names.append(self.toks[self.i][1][1:])
            self.i += 1
        if isinstance(node, (_Literal, _Dot, _Nil)):
            raise _ParseError(pos, f"unexpected . after term {go_quote(str(node))}")
        if isinstance(node, _Field):
            return _Field(node.names + tuple(names), pos)
        if isinstance(node, _Variable):
            return _Variable(node.slot, node.name, node.names + tuple(names), pos)
        return _Chain(node, tuple(names), pos)

    def _term(self) -> _Expr | None:
        kind, value, pos = self._peek_ns()
        if kind not in _OPERAND_START:
            return None
        self.i += 1
        if kind == "ident":
            func = _FUNCS.get(value)
            if func is None:
                raise _ParseError(pos, f"function {go_quote(value)} not defined")
            return _Ident(value, func, pos)
        if kind == "field":
            return _Field((value[1:],), pos)
        if kind == "var":
            return _Variable(self._lookup(value, pos), value, (), pos)
        if kind == "dot":
            return _Dot(pos)
        if kind == "nil":
            return _Nil(pos)
        if kind == "lparen":
            return self._pipeline("parenthesized pipeline", "rparen")
        if kind == "bool":
            return _Literal(value == "true", value, pos)
        if kind in ("string", "raw"):
            return _Literal(_unquote(value, pos), value, pos)
        return _Literal(_number(kind, value, pos), value, pos)


# ---- public API -----------------------------------------------------------------------------------


def _error(name: str, text: str, pos: int, message: str) -> TemplateError:
    line = text.count("\n", 0, pos) + 1
    col = len(text[text.rfind("\n", 0, pos) + 1 : pos].encode())
    return TemplateError(f"template: {name}:{line}:{col}: {message}", name=name, line=line, col=col)


class Template:
    """A parsed template. Parse once, render many times, from any thread (render keeps no state here)."""

    __slots__ = ("_n_slots", "_nodes", "_text", "name")

    def __init__(self, name: str, text: str, nodes: tuple[_Node, ...], n_slots: int) -> None:
        self.name = name
        self._text = text
        self._nodes = nodes
        self._n_slots = n_slots

    @classmethod
    def parse(cls, name: str, text: str) -> Template:
        """Raises TemplateError for bad syntax, unknown functions and undefined variables."""
        try:
            parser = _Parser(text)
            nodes = parser.parse()
        except _ParseError as exc:
            raise _error(name, text, exc.pos, str(exc)) from None
        return cls(name, text, nodes, parser.n_slots)

    def render(self, data: Any) -> str:
        """Execute over `data` (a GoStruct from prompt_data & co., or plain values). Raises TemplateError."""
        st = _State(self._n_slots, data)
        try:
            _walk(self._nodes, st, data)
        except _ExecError as exc:
            message = f"executing {go_quote(self.name)} at <{exc.node}>: {exc}"
            raise _error(self.name, self._text, exc.node.pos, message) from None
        return "".join(st.out)


@functools.lru_cache(maxsize=256)
def _parsed(name: str, text: str) -> Template:
    return Template.parse(name, text)


def render(name: str, text: str, data: Any) -> str:
    """Parse (cached on name and text) and execute; raises TemplateError."""
    return _parsed(name, text).render(data)
