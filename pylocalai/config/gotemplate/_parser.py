"""The parser: lexed items into a tree of nodes, with variables resolved to frame slots."""

from __future__ import annotations

from typing import Final

from pylocalai.config._govalue import go_quote
from pylocalai.config.gotemplate._funcs import _FUNCS
from pylocalai.config.gotemplate._lexer import _lex, _number, _ParseError, _Token, _unquote
from pylocalai.config.gotemplate._nodes import (
    _Action,
    _Chain,
    _Command,
    _Control,
    _Dot,
    _Expr,
    _Field,
    _Ident,
    _If,
    _Literal,
    _Nil,
    _Node,
    _Pipe,
    _Range,
    _Text,
    _Variable,
    _With,
)


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
