"""Go values as LocalAI's templates see them: structs with zero values, fmt printing, json.Marshal.

LocalAI executes prompt templates on Go structs. A field missing from the data is that field's zero
value there, never an error, while a field the struct lacks is an execution error, and toJson writes
the struct's JSON tag names. StructType/GoStruct carry exactly that; the factories at the bottom build
the three data types of the spec (localai-compat.md, section 4.2) from wire-shaped Python values.

Python stands for Go like this: str, int, float, bool; None for nil; dict for a map (StringMap for
map[string]string); list or tuple for a slice; GoStruct for a struct. NIL_MAP, NIL_STRING_MAP and
NIL_SLICE are Go's nil map and slice: empty everywhere, but `null` in JSON. None of them is mutated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "CHAT_MESSAGE_DATA",
    "MULTIMODAL_DATA",
    "NIL_MAP",
    "NIL_SLICE",
    "NIL_STRING_MAP",
    "PROMPT_DATA",
    "GoStruct",
    "StringMap",
    "StructType",
    "chat_message_data",
    "format_value",
    "function_struct",
    "go_quote",
    "go_type",
    "json_decoded",
    "marshal_json",
    "multimodal_data",
    "prompt_data",
    "sprint",
    "sprintf",
    "sprintln",
    "tool_call_struct",
]


class _GoNil:
    """Marks the typed nil values: they marshal as `null` where an empty one gives [] or {}."""

    __slots__ = ()


class StringMap(dict[str, str]):
    """Go's map[string]string (PromptTemplateData.Metadata): index of a missing key gives "", not nil."""

    __slots__ = ()


class _NilMap(dict[str, Any], _GoNil):
    __slots__ = ()


class _NilStringMap(StringMap, _GoNil):
    __slots__ = ()


class _NilSlice(tuple[Any, ...], _GoNil):
    __slots__ = ()


NIL_MAP: Final = _NilMap()
NIL_STRING_MAP: Final = _NilStringMap()
NIL_SLICE: Final = _NilSlice()


class StructType:
    """A Go struct type: its name (for error messages), fields in declaration order with their zero
    values, and each field's JSON name (the Go name unless a `json:"..."` tag renames it)."""

    __slots__ = ("json_names", "name", "zero")

    def __init__(self, name: str, zero: Mapping[str, Any], json_names: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.zero: dict[str, Any] = dict(zero)
        renamed = json_names or {}
        self.json_names: dict[str, str] = {field: renamed.get(field, field) for field in self.zero}

    def new(self, values: Mapping[str, Any]) -> GoStruct:
        """A struct value; fields left out of `values` hold their zero value. Unknown names: TypeError."""
        unknown = values.keys() - self.zero.keys()
        if unknown:
            raise TypeError(f"{self.name} has no field {sorted(unknown)[0]}")
        return GoStruct(self, {**self.zero, **values})

    def __repr__(self) -> str:
        return f"StructType({self.name!r})"


class GoStruct:
    """One struct value. `values` holds every field of `type`, in declaration order."""

    __slots__ = ("type", "values")

    def __init__(self, type_: StructType, values: dict[str, Any]) -> None:
        self.type = type_
        self.values = values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GoStruct) and other.type is self.type and other.values == self.values

    def __repr__(self) -> str:
        return f"GoStruct({self.type.name}, {self.values!r})"


# ---- names and printing (fmt's %v) ----------------------------------------------------------------

_TYPE_NAMES: Final[dict[type, str]] = {
    str: "string",
    bool: "bool",
    int: "int",
    float: "float64",
    list: "[]interface {}",
    tuple: "[]interface {}",
    dict: "map[string]interface {}",
    StringMap: "map[string]string",
}


def go_type(value: Any) -> str:
    """The Go type name printed in error messages and by %T."""
    if value is None:
        return "<nil>"
    if isinstance(value, GoStruct):
        return value.type.name
    for cls in type(value).__mro__:
        if cls in _TYPE_NAMES:
            return _TYPE_NAMES[cls]
    return type(value).__name__


def _digits(magnitude: float) -> tuple[str, int]:
    """Shortest round-trip digits D and point position P with magnitude == 0.D x 10**P (as Go's strconv)."""
    mantissa, _, exponent = repr(magnitude).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    significant = digits.lstrip("0")
    if not significant:
        return "0", 1
    point = len(whole) + (int(exponent) if exponent else 0) - (len(digits) - len(significant))
    return significant.rstrip("0"), point


def _fixed(digits: str, point: int) -> str:
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return digits[:point] + "." + digits[point:]


def _scientific(digits: str, point: int) -> str:
    exponent = point - 1
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def _format_float(value: float) -> str:
    """fmt's %v for a float64: shortest digits, %e once the exponent is below -4 or at least 6."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    digits, point = _digits(abs(value))
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    exponent = point - 1
    if exponent < -4 or exponent >= 6:
        return sign + _scientific(digits, point)
    return sign + _fixed(digits, point)


def _compose(value: Any, element: Callable[[Any], str]) -> str | None:
    """fmt's layout of a map, slice or struct with `element` formatting each part; None for a scalar."""
    if isinstance(value, GoStruct):
        return "{" + " ".join(element(v) for v in value.values.values()) + "}"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{element(k)}:{element(value[k])}" for k in sorted(value)) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(element(v) for v in value) + "]"
    return None


def format_value(value: Any) -> str:
    """fmt.Sprint of one operand (%v): nil is <nil>, maps print sorted as map[k:v], slices as [a b]."""
    cls = value.__class__
    if cls is str:
        return value  # type: ignore[no-any-return]  # narrowed by the class check
    if value is None:
        return "<nil>"
    if cls is bool:
        return "true" if value else "false"
    if cls is int:
        return str(value)
    if cls is float:
        return _format_float(value)
    composed = _compose(value, format_value)
    if composed is not None:
        return composed
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _format_float(value)
    return str(value)


def sprint(args: Sequence[Any]) -> str:
    """fmt.Sprint: a space between two operands only when neither is a string."""
    parts: list[str] = []
    previous_string = False
    for i, arg in enumerate(args):
        is_string = isinstance(arg, str)
        if i and not is_string and not previous_string:
            parts.append(" ")
        parts.append(format_value(arg))
        previous_string = is_string
    return "".join(parts)


def sprintln(args: Sequence[Any]) -> str:
    """fmt.Sprintln: spaces between all operands, then a newline."""
    return " ".join(format_value(arg) for arg in args) + "\n"


_QUOTE_ESCAPES: Final = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def go_quote(text: str, quote: str = '"') -> str:
    """strconv.Quote: escapes quotes, backslashes and non-printable characters."""
    parts = [quote]
    for ch in text:
        if ch == quote or ch == "\\":
            parts.append("\\" + ch)
        elif ch in _QUOTE_ESCAPES:
            parts.append(_QUOTE_ESCAPES[ch])
        elif ch.isprintable():
            parts.append(ch)
        else:
            code = ord(ch)
            if code < 0x20 or code == 0x7F:
                parts.append(f"\\x{code:02x}")
            else:
                parts.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    parts.append(quote)
    return "".join(parts)


_VERB = re.compile(r"%([-+# 0]*)(\d+)?(?:\.(\d*))?(.)?", re.S)


def _bad_verb(verb: str, value: Any) -> str:
    if value is None:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({go_type(value)}={format_value(value)})"


def _format_arg(value: Any, flags: str, width: str | None, precision: str | None, verb: str) -> str:
    """One printf directive. Numbers go through Python's %-formatting, which shares Go's flags."""
    cls = value.__class__
    if cls is int and verb in "dxXo" or cls is float and (verb in "eEfF" or precision is not None and verb in "gGv"):
        spec = "%" + flags + (width or "") + ("" if precision is None else "." + precision)
        return str((spec + ("g" if verb == "v" else verb)) % value)
    if verb == "T":
        text = go_type(value)
    elif verb == "v":
        text = format_value(value)
    elif (composed := _compose(value, lambda v: _format_arg(v, flags, None, precision, verb))) is not None:
        text = composed
    elif cls is str and verb == "s":
        text = value if precision is None else value[: int(precision or 0)]
    elif cls is str and verb == "q":
        text = go_quote(value)
    elif cls is str and verb in "xX":
        text = value.encode().hex() if verb == "x" else value.encode().hex().upper()
    elif cls is bool and verb == "t":
        text = "true" if value else "false"
    elif cls is int and verb == "b":
        text = format(value, "b")
    elif cls is int and verb in "cq" and 0 <= value <= 0x10FFFF:
        text = chr(value) if verb == "c" else go_quote(chr(value), "'")
    elif cls is int and verb == "U":
        text = f"U+{value:04X}"
    elif cls is float and verb in "gG":
        text = _format_float(value) if verb == "g" else _format_float(value).upper()
    else:
        text = _bad_verb(verb, value)
    if width and len(text) < int(width):
        text = text.ljust(int(width)) if "-" in flags else text.rjust(int(width))
    return text


def sprintf(fmt: str, args: Sequence[Any]) -> str:
    """fmt.Sprintf for the verbs templates use (%s %d %v %q %t %f %e %g %x %c %T %%), with Go's
    %!v(MISSING) / %!d(string=x) / %!(EXTRA ...) markers for mismatched arguments."""
    parts: list[str] = []
    position = 0
    used = 0
    for match in _VERB.finditer(fmt):
        parts.append(fmt[position : match.start()])
        position = match.end()
        flags, width, precision, verb = match.groups()
        if verb is None:
            parts.append("%!(NOVERB)")
        elif verb == "%":
            parts.append("%")
        elif used >= len(args):
            parts.append(f"%!{verb}(MISSING)")
        else:
            parts.append(_format_arg(args[used], flags, width, precision, verb))
            used += 1
    parts.append(fmt[position:])
    if used < len(args):
        extra = ", ".join("<nil>" if a is None else f"{go_type(a)}={format_value(a)}" for a in args[used:])
        parts.append(f"%!(EXTRA {extra})")
    return "".join(parts)


# ---- json.Marshal ---------------------------------------------------------------------------------

_JSON_ESCAPES: Final = {chr(c): f"\\u{c:04x}" for c in range(0x20)} | {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_JSON_SPECIAL = re.compile('[\x00-\x1f"\\\\<>&\u2028\u2029]')


def _json_string(text: str) -> str:
    return '"' + _JSON_SPECIAL.sub(lambda m: _JSON_ESCAPES[m.group()], text) + '"'


def _json_float(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"json: unsupported value: {_format_float(value)}")
    magnitude = abs(value)
    digits, point = _digits(magnitude)
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        text = _scientific(digits, point)
        if text[-4:-1] == "e-0":  # Go writes e-7, not e-07
            text = text[:-2] + text[-1]
        return sign + text
    return sign + _fixed(digits, point)


def _json(value: Any, out: list[str]) -> None:
    if value is None or isinstance(value, _GoNil):
        out.append("null")
    elif isinstance(value, str):
        out.append(_json_string(value))
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_json_float(value))
    elif isinstance(value, GoStruct):
        names = value.type.json_names
        _json_object(((names[field], v) for field, v in value.values.items()), out)
    elif isinstance(value, Mapping):
        _json_object(sorted((str(k), v) for k, v in value.items()), out)
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _json(item, out)
        out.append("]")
    else:
        raise ValueError(f"json: unsupported type: {go_type(value)}")


def _json_object(items: Iterable[tuple[str, Any]], out: list[str]) -> None:
    out.append("{")
    for i, (key, item) in enumerate(items):
        out.append(("," if i else "") + _json_string(key) + ":")
        _json(item, out)
    out.append("}")


def marshal_json(value: Any) -> str:
    """json.Marshal: compact, map keys sorted, struct fields by JSON name, <>& escaped as \\u003c etc.
    Raises ValueError for what Go refuses (NaN, infinities, values JSON cannot hold)."""
    out: list[str] = []
    _json(value, out)
    return "".join(out)


# ---- LocalAI's template data types (localai-compat.md 4.2) ----------------------------------------

_FUNCTION: Final = StructType(
    "functions.Function",
    {"Name": "", "Description": "", "Strict": False, "Parameters": NIL_MAP},
    {"Name": "name", "Description": "description", "Strict": "strict", "Parameters": "parameters"},
)
_FUNCTION_CALL: Final = StructType(
    "schema.FunctionCall", {"Name": "", "Arguments": ""}, {"Name": "name", "Arguments": "arguments"}
)
_TOOL_CALL: Final = StructType(
    "schema.ToolCall",
    {"Index": 0, "ID": "", "Type": "", "FunctionCall": _FUNCTION_CALL.new({})},
    {"Index": "index", "ID": "id", "Type": "type", "FunctionCall": "function"},
)
_MEDIA: Final = StructType("templates.MultimodalContent", {"ID": 0})

PROMPT_DATA: Final = StructType(
    "templates.PromptTemplateData",
    {
        "SystemPrompt": "",
        "SuppressSystemPrompt": False,
        "Input": "",
        "Instruction": "",
        "Functions": NIL_SLICE,
        "MessageIndex": 0,
        "ReasoningEffort": "",
        "Metadata": NIL_STRING_MAP,
    },
)
CHAT_MESSAGE_DATA: Final = StructType(
    "templates.ChatMessageTemplateData",
    {
        "SystemPrompt": "",
        "Role": "",
        "RoleName": "",
        "FunctionName": "",
        "Content": "",
        "MessageIndex": 0,
        "Function": False,
        "FunctionCall": None,
        "LastMessage": False,
    },
)
MULTIMODAL_DATA: Final = StructType(
    "struct { Audio []templates.MultimodalContent; Images []templates.MultimodalContent; "
    "Video []templates.MultimodalContent; Text string }",
    {"Audio": NIL_SLICE, "Images": NIL_SLICE, "Video": NIL_SLICE, "Text": ""},
)


def json_decoded(value: Any) -> Any:
    """A JSON value as Go's json.Unmarshal into interface{} holds it: every number a float64."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): json_decoded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_decoded(v) for v in value]
    return value


def function_struct(function: Mapping[str, Any] | GoStruct) -> GoStruct:
    """An OpenAI-style function definition {name, description, strict, parameters} as functions.Function."""
    if isinstance(function, GoStruct):
        return function
    parameters = function.get("parameters")
    return _FUNCTION.new(
        {
            "Name": function.get("name") or "",
            "Description": function.get("description") or "",
            "Strict": bool(function.get("strict")),
            "Parameters": NIL_MAP if parameters is None else json_decoded(parameters),
        }
    )


def tool_call_struct(call: Mapping[str, Any] | GoStruct) -> GoStruct:
    """A wire tool call {index, id, type, function: {name, arguments}} as schema.ToolCall."""
    if isinstance(call, GoStruct):
        return call
    function = call.get("function") or {}
    return _TOOL_CALL.new(
        {
            "Index": int(call.get("index") or 0),
            "ID": call.get("id") or "",
            "Type": call.get("type") or "",
            "FunctionCall": _FUNCTION_CALL.new(
                {"Name": function.get("name") or "", "Arguments": function.get("arguments") or ""}
            ),
        }
    )


def prompt_data(**fields: Any) -> GoStruct:
    """PromptTemplateData (chat, function, completion and edit templates). `Functions` takes wire-shaped
    function definitions; `Metadata` a str -> str mapping."""
    if fields.get("Functions") is not None:
        fields["Functions"] = [function_struct(f) for f in fields["Functions"]]
    if fields.get("Metadata") is not None:
        fields["Metadata"] = StringMap(fields["Metadata"])
    return PROMPT_DATA.new(fields)


def chat_message_data(**fields: Any) -> GoStruct:
    """ChatMessageTemplateData. `FunctionCall` is a list of wire tool calls, the legacy function_call
    object (kept as decoded JSON, so templates use `index .FunctionCall "name"`), or None."""
    call = fields.get("FunctionCall")
    if isinstance(call, (list, tuple)):
        fields["FunctionCall"] = [tool_call_struct(c) for c in call]
    elif call is not None:
        fields["FunctionCall"] = json_decoded(call)
    return CHAT_MESSAGE_DATA.new(fields)


def _media(item: int | Mapping[str, Any] | GoStruct) -> GoStruct:
    if isinstance(item, GoStruct):
        return item
    return _MEDIA.new({"ID": int(item if isinstance(item, int) else item["ID"])})


def multimodal_data(**fields: Any) -> GoStruct:
    """The multimodal template's data. Audio/Images/Video list media items: a running index or {"ID": n}."""
    for kind in ("Audio", "Images", "Video"):
        if fields.get(kind) is not None:
            fields[kind] = [_media(item) for item in fields[kind]]
    return MULTIMODAL_DATA.new(fields)
