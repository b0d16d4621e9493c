"""Nodes and their evaluation: operands (_Expr), commands, pipelines and statements (_Node)
execute over a _State; template functions report their failures as _CallError or _ArgTypeError."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pylocalai.config._govalue import GoStruct, format_value, go_type


class _ExecError(Exception):
    def __init__(self, node: _Expr | _Command | _Node, message: str) -> None:
        super().__init__(message)
        self.node = node


class _CallError(Exception):
    """Raised by a template function; reported as 'error calling NAME: ...'."""


class _ArgTypeError(Exception):
    """An argument Go refuses before calling the function; reported as it is."""


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
