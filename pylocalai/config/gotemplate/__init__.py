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
from typing import Any

from pylocalai.config._govalue import chat_message_data, go_quote, multimodal_data, prompt_data
from pylocalai.config.gotemplate._lexer import _ParseError
from pylocalai.config.gotemplate._nodes import _ExecError, _Node, _State, _walk
from pylocalai.config.gotemplate._parser import _Parser
from pylocalai.errors import InvalidRequestError

__all__ = ["Template", "TemplateError", "chat_message_data", "multimodal_data", "prompt_data", "render"]


class TemplateError(InvalidRequestError):
    """A template that does not parse, or fails while executing; the message names NAME:LINE:COL."""

    def __init__(self, message: str, *, name: str, line: int, col: int) -> None:
        super().__init__(message)
        self.name = name
        self.line = line
        self.col = col


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
