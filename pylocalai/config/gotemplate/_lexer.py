"""The lexer: template text into text chunks and actions' tokens, and the literal readers
(strconv.Unquote, Go numeric and character constants) the parser applies to them."""

from __future__ import annotations

import re
from typing import Any, Final

from pylocalai.config._govalue import go_quote


class _ParseError(Exception):
    def __init__(self, pos: int, message: str) -> None:
        super().__init__(message)
        self.pos = pos


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
