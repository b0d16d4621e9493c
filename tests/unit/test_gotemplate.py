"""The Go text/template interpreter: Go 1.19's output on LocalAI's gallery templates, byte for byte,
then the Go semantics the corpus does not reach (trimming, truthiness, printing, scoping, errors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pylocalai.config import gotemplate
from pylocalai.config.gotemplate import (
    Template,
    TemplateError,
    chat_message_data,
    multimodal_data,
    prompt_data,
    render,
)
from pylocalai.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "spec" / "gotemplate-corpus" / "cases.json"
FACTORIES = {"prompt": prompt_data, "chat_message": chat_message_data, "multimodal": multimodal_data}
TOOL_CALL = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _corpus() -> list[Any]:
    if not CORPUS.is_file():
        reason = f"the Go template corpus is not at {CORPUS} (it lives in the shared folder beside the repo)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="corpus-missing")]
    return [pytest.param(case, id=case["name"]) for case in json.loads(CORPUS.read_text())]


def _render(text: str, data: Any = None) -> str:
    return Template.parse("t", text).render(data)


def _error(text: str, data: Any = None) -> TemplateError:
    with pytest.raises(TemplateError) as excinfo:
        _render(text, data)
    return excinfo.value


@pytest.mark.parametrize("case", _corpus())
def test_corpus_case_matches_go(case: dict[str, Any]) -> None:
    data = FACTORIES[case["kind"]](**case["data"])
    if not case.get("error"):
        assert Template.parse("prompt", case["template"]).render(data) == case["expected"]
        return
    with pytest.raises(TemplateError) as excinfo:
        Template.parse("prompt", case["template"]).render(data)
    if case.get("error_phase") == "exec":  # Go's parse errors carry no column; execution errors match exactly
        assert str(excinfo.value) == case["error_message"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a  \n{{- 1 -}}\n  b", "a1b"),
        ("a \t{{- 1}} b", "a1 b"),
        ("a {{1 -}}\r\n\t b", "a 1b"),
        ("{{-3}}", "-3"),  # no space after the dash: a negative number, not a trim marker
        ("{{ 3 -}}  x", "3x"),
        ("x {{- /* c */ -}} y", "xy"),
        ("x {{/* c */}} y", "x  y"),
        ("{{ if\n true }}yes{{ end }}", "yes"),
    ],
)
def test_trim_markers_and_comments(text: str, expected: str) -> None:
    assert _render(text) == expected


def test_trim_markers_act_on_template_text_only() -> None:
    assert _render("{{.Input -}}\n  X", prompt_data(Input="a\n")) == "a\nX"


@pytest.mark.parametrize(
    ("value", "truth"),
    [
        (False, False),
        (0, False),
        (0.0, False),
        ("", False),
        ([], False),
        ({}, False),
        (None, False),
        (True, True),
        (-1, True),
        (0.5, True),
        (" ", True),
        ([0], True),
        ({"a": None}, True),
        (prompt_data(), True),  # a struct is always true, even all zero
    ],
)
def test_truthiness(value: Any, truth: bool) -> None:
    assert _render("{{if .}}T{{else}}F{{end}}", value) == ("T" if truth else "F")
    assert _render("{{not .}}", value) == ("false" if truth else "true")


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        ("{{.Missing}}", {}, "<no value>"),
        ("{{.Missing.Deeper}}", {}, "<no value>"),
        ("{{print .Missing}}", {}, "<nil>"),
        ("{{.M}}", {"M": {"b": 2, "a": [1, "x"]}}, "map[a:[1 x] b:2]"),
        ("{{.}}", [1, "a", None, True], "[1 a <nil> true]"),
        ("{{.}}", 42, "42"),
        ("{{.}}", 1.5, "1.5"),
        ("{{.}}", 2.0, "2"),
        ("{{.}}", 100000.0, "100000"),
        ("{{.}}", 1e6, "1e+06"),
        ("{{.}}", 1234567.0, "1.234567e+06"),
        ("{{.}}", 0.0001, "0.0001"),
        ("{{.}}", 0.00001, "1e-05"),
        ("{{1e3}} {{1.0}} {{0x1F}} {{'a'}} {{-7}}", None, "1000 1 31 97 -7"),
        ("{{true}} {{.}}", False, "true false"),
        ('{{print 1 2 "a" "b" 3 true}}', None, "1 2ab3 true"),
        ('{{println 1 "a"}}', None, "1 a\n"),
        ('{{"a\\tb\\u00e9\\x41"}} {{`raw {{x}} \\n`}}', None, "a\tbéA raw {{x}} \\n"),
        ("{{.FunctionCall}}", chat_message_data(FunctionCall=[TOOL_CALL]), "[{0 c1 function {f {}}}]"),
    ],
)
def test_printing_follows_fmt(text: str, data: Any, expected: str) -> None:
    assert _render(text, data) == expected


def test_struct_fields_missing_from_data_are_zero_values() -> None:
    text = "{{.Input}}|{{.MessageIndex}}|{{.SuppressSystemPrompt}}|{{.Functions}}|{{len .Functions}}|{{.Metadata}}"
    assert _render(text, prompt_data()) == "|0|false|[]|0|map[]"
    zero_json = "{{toJson .Functions}} {{toJson .Metadata}} {{index .Metadata `k`}}|"
    assert _render(zero_json, prompt_data()) == "null null |"
    nil_call = "{{if .FunctionCall}}call{{else}}none{{end}} {{.FunctionCall}}"
    assert _render(nil_call, chat_message_data()) == "none <no value>"
    assert _render("{{range .Images}}x{{else}}no images{{end}}", multimodal_data()) == "no images"


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        ('{{ or .A "x" }}', {"A": ""}, "x"),
        ('{{ or .A "x" }}', {"A": "y"}, "y"),
        ("{{ and 1 0 2 }}", None, "0"),
        ("{{ and 1 2 }}", None, "2"),
        ('{{ or 0 "" }}', None, ""),
        ('{{ .A | or "z" }}', {"A": "piped"}, "z"),
        ('{{ .A | and "z" }}', {"A": "piped"}, "piped"),
        ("{{ or 1 (index .L 5) }}", {"L": []}, "1"),  # short-circuit: the failing index never runs
        ("{{ and 0 (index .L 5) }}", {"L": []}, "0"),
    ],
)
def test_and_or_return_an_operand_and_short_circuit(text: str, data: Any, expected: str) -> None:
    assert _render(text, data) == expected


def test_or_evaluates_operands_until_one_decides() -> None:
    assert "error calling index: index out of range: 5" in str(_error("{{ or 0 (index .L 5) }}", {"L": []}))


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        ('{{$x := "a"}}{{range .L}}{{$x = .}}{{end}}{{$x}}', {"L": [1, 2]}, "2"),
        ("{{$x := 1}}{{if true}}{{$x := 2}}{{$x}}{{end}}{{$x}}", None, "21"),
        ("{{with $x := .A}}{{$x}}{{end}}", {"A": "q"}, "q"),
        ("{{range .L}}{{$.N}}{{.}}{{end}}", {"L": [1, 2], "N": "n"}, "n1n2"),
        ("{{$x := 1}}{{$x := print $x 2}}{{$x}}", None, "1 2"),
    ],
)
def test_variable_assignment_and_scoping(text: str, data: Any, expected: str) -> None:
    assert _render(text, data) == expected


@pytest.mark.parametrize(
    "text",
    [
        "{{range .L}}{{$y := .}}{{end}}{{$y}}",
        "{{if true}}{{$y := 1}}{{end}}{{$y}}",
        "{{with $y := 1}}{{end}}{{$y}}",
        "{{range $i, $y := .L}}{{end}}{{$y}}",
        "{{$y = 1}}",
    ],
)
def test_variable_out_of_scope_is_a_parse_error(text: str) -> None:
    with pytest.raises(TemplateError, match='undefined variable "\\$y"'):
        Template.parse("t", text)


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        ("{{range $k, $v := .M}}{{$k}}={{$v}};{{end}}", {"M": {"b": 2, "a": 1, "c": 3}}, "a=1;b=2;c=3;"),
        ("{{range .M}}{{.}}{{end}}", {"M": {"b": 2, "a": 1}}, "12"),
        ("{{range $i, $e := .L}}{{$i}}:{{$e}} {{end}}", {"L": ["a", "b"]}, "0:a 1:b "),
        ("{{range $e := .L}}[{{$e}}]{{end}}", {"L": ["a", "b"]}, "[a][b]"),
        ("{{range .L}}x{{else}}empty{{end}}", {"L": []}, "empty"),
        ("{{range .Missing}}x{{else}}nil{{end}}", {}, "nil"),
        ("{{range .L}}{{.}}{{else}}empty{{end}}", {"L": [1]}, "1"),
        ("{{with .A}}[{{.}}]{{else}}none{{end}}", {"A": "x"}, "[x]"),
        ("{{with .A}}[{{.}}]{{else}}none{{end}}", {"A": ""}, "none"),
        ("{{if .A}}a{{else if .B}}b{{else}}c{{end}}", {"B": 1}, "b"),
        ("{{if .A}}a{{else if .B}}b{{else}}c{{end}}", {}, "c"),
    ],
)
def test_range_with_and_else(text: str, data: Any, expected: str) -> None:
    assert _render(text, data) == expected


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        ('{{index .M "a" "b"}}', {"M": {"a": {"b": "deep"}}}, "deep"),
        ('{{index .M "a" 1 "c"}}', {"M": {"a": [0, {"c": "x"}]}}, "x"),
        ("{{index .L 1}}", {"L": [0, 1]}, "1"),
        ("{{index .L (len .L | add1 | print | len)}}", {"L": [7, 8]}, "8"),
        ('{{index .M "zz"}}', {"M": {}}, "<no value>"),
        ('{{if index .M "zz"}}y{{else}}n{{end}}', {"M": {}}, "n"),
        ('{{index .Metadata "zz"}}|', prompt_data(Metadata={"k": "v"}), "|"),  # map[string]string: zero is ""
        ('{{ (index .M "a").b }}', {"M": {"a": {"b": "c"}}}, "c"),
    ],
)
def test_index(text: str, data: Any, expected: str) -> None:
    assert _render(text, data) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{{printf "%s=%d %v %q %t" "a" 3 1.5 "q\\"x" true}}', 'a=3 1.5 "q\\"x" true'),
        (
            '{{printf "%5.2f|%-4s|%4s|%x|%05d|%e|%g" 3.14159 "ab" "ab" 255 42 1500.0 1e6}}',
            " 3.14|ab  |  ab|ff|00042|1.500000e+03|1e+06",
        ),
        ('{{printf "%v %v %s" .M .L .L}}', "map[a:1] [x y] [x y]"),
        ('{{printf "%d %d" 1}}', "1 %!d(MISSING)"),
        ('{{printf "%d" "x"}}', "%!d(string=x)"),
        ('{{printf "%s" 1 2}}', "%!s(int=1)%!(EXTRA int=2)"),
        ('{{printf "100%%"}}', "100%"),
        ('{{ "abc" | upper | printf "%s!" }}', "ABC!"),
    ],
)
def test_printf(text: str, expected: str) -> None:
    assert _render(text, {"M": {"a": 1}, "L": ["x", "y"]}) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{{eq .R "a" "b" "c"}}', "true"),
        ('{{eq .R "x" "y"}}', "false"),
        ("{{eq .Missing 1}}", "false"),
        ("{{ne 1 2}} {{ne .R .R}}", "true false"),
        ("{{lt 1 2}} {{le 2 2}} {{gt 2.5 1.5}} {{ge 1 2}}", "true true true false"),
        ('{{lt "a" "b"}}', "true"),
        ("{{eq 1.5 1.5}}", "true"),
    ],
)
def test_comparisons(text: str, expected: str) -> None:
    assert _render(text, {"R": "b"}) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{lt 1 1.5}}", "error calling lt: incompatible types for comparison"),
        ("{{eq 1 1.0}}", "error calling eq: incompatible types for comparison"),
        ('{{eq 1 "1"}}', "error calling eq: incompatible types for comparison"),
        ("{{lt true false}}", "error calling lt: invalid type for comparison"),
        ("{{eq 1}}", "error calling eq: missing argument for comparison"),
    ],
)
def test_comparison_errors(text: str, message: str) -> None:
    assert str(_error(text)).endswith(message)


def test_to_json_is_go_json_marshal() -> None:
    data = {"z": "<b>&</b>", "a": [1, 2.0, 1e21, 1e-7, None, True, "\n\x01"], "m": {}}
    expected = '{"a":[1,2,1e+21,1e-7,null,true,"\\n\\u0001"],"m":{},"z":"\\u003cb\\u003e\\u0026\\u003c/b\\u003e"}'
    assert _render("{{toJson .}}", data) == expected
    tools = prompt_data(Functions=[{"name": "f", "parameters": {"type": "object", "maximum": 10000000}}])
    assert (
        _render("{{toJson .Functions}}", tools)
        == '[{"name":"f","description":"","strict":false,"parameters":{"maximum":10000000,"type":"object"}}]'
    )
    call = chat_message_data(FunctionCall=[TOOL_CALL])
    expected_call = '[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]'
    assert _render("{{toJson .FunctionCall}}", call) == expected_call


def test_decoded_json_numbers_are_float64_like_go() -> None:
    data = chat_message_data(FunctionCall={"name": "f", "n": 10000000})
    assert _render('{{index .FunctionCall "n"}} {{toJson .FunctionCall}}', data) == '1e+07 {"n":10000000,"name":"f"}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{{trim "  x \\n"}}', "x"),
        ('{{upper "ab"}}{{lower "CD"}}', "ABcd"),
        ('{{contains "b" "abc"}} {{contains "z" "abc"}}', "true false"),
        ('{{hasPrefix "a" "abc"}} {{hasSuffix "c" "abc"}} {{hasSuffix "a" "abc"}}', "true true false"),
        ('{{replace "a" "b" "aaa"}}', "bbb"),
        ('{{join ", " .L}}', "x, 1, y"),
        ('{{default "d" ""}} {{default "d" "v"}} {{"" | default "piped"}}', "d v piped"),
        ('{{empty ""}} {{empty .L}}', "true false"),
        ("{{toString 5}} {{toString .L}}", "5 [x 1 <nil> y]"),
        ('{{add1 4}} {{add1 "2"}} {{add1 .Missing}}', "5 3 1"),
        ('{{len "héllo"}} {{len .L}}', "6 4"),  # len of a string counts bytes, as in Go
    ],
)
def test_sprig_helpers(text: str, expected: str) -> None:
    assert _render(text, {"L": ["x", 1, None, "y"]}) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\n  {{ if .X }}", "template: t:2:5: unexpected EOF: {{if}} has no {{end}}"),
        ("{{ foo 1 }}", 'template: t:1:3: function "foo" not defined'),
        ("x{{ .A", "template: t:1:1: unclosed action"),
        ("{{end}}", "template: t:1:0: unexpected {{end}}"),
        ("{{if .A}}{{else}}{{else}}{{end}}", "template: t:1:17: expected end; found {{else}}"),
        ('{{ .A | "x" }}', "template: t:1:8: non executable command in pipeline stage 2"),
        ("{{/* x }}", "template: t:1:0: unclosed comment"),
        ("{{ (1 }}", "template: t:1:6: unclosed left paren"),
        ('{{ "x }}', "template: t:1:3: unterminated quoted string"),
        ('{{ .A"x" }}', "template: t:1:5: bad character '\"'"),
        ("{{}}", "template: t:1:2: missing value for command"),
        ('{{template "x"}}', "template: t:1:2: {{template}} is not supported"),
    ],
)
def test_parse_errors_name_the_template_and_position(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as excinfo:
        Template.parse("t", text)
    assert str(excinfo.value) == message
    assert isinstance(excinfo.value, InvalidRequestError)


def test_parse_error_carries_line_and_column() -> None:
    with pytest.raises(TemplateError) as excinfo:
        Template.parse("chat", "line one\n  {{ nope }}")
    assert (excinfo.value.name, excinfo.value.line, excinfo.value.col) == ("chat", 2, 5)


@pytest.mark.parametrize(
    ("text", "data", "message"),
    [
        (
            "{{.Nope}}",
            prompt_data(),
            'template: t:1:2: executing "t" at <.Nope>: '
            "can't evaluate field Nope in type templates.PromptTemplateData",
        ),
        (
            "x\n {{.FunctionCall.Name}}",
            chat_message_data(),
            'template: t:2:16: executing "t" at <.FunctionCall.Name>: nil pointer evaluating interface {}.Name',
        ),
        ('{{ .A "x" }}', {"A": 1}, 'template: t:1:3: executing "t" at <.A>: A is not a method but has arguments'),
        (
            '{{ .Content "x" }}',
            chat_message_data(),
            'template: t:1:3: executing "t" at <.Content>: Content has arguments but cannot be invoked as function',
        ),
        (
            "{{upper 5}}",
            None,
            'template: t:1:2: executing "t" at <upper 5>: wrong type for value; expected string; got int',
        ),
        ("{{len 3}}", None, 'template: t:1:2: executing "t" at <len 3>: error calling len: len of type int'),
        ("{{not}}", None, 'template: t:1:2: executing "t" at <not>: wrong number of args for not: want 1 got 0'),
        (
            "{{.S.X}}",
            {"S": "str"},
            'template: t:1:4: executing "t" at <.S.X>: can\'t evaluate field X in type string',
        ),
        ("{{range .S}}{{end}}", {"S": "abc"}, "range can't iterate over abc"),
    ],
)
def test_execution_errors_name_the_template_and_position(text: str, data: Any, message: str) -> None:
    assert str(_error(text, data)).endswith(message)
    assert str(_error(text, data)).startswith("template: t:")


def test_render_parses_once_per_name_and_text() -> None:
    gotemplate._parsed.cache_clear()
    assert render("cached", "{{.}}!", 1) == "1!"
    assert render("cached", "{{.}}!", 2) == "2!"
    assert gotemplate._parsed.cache_info().hits == 1
    with pytest.raises(TemplateError, match="unclosed action"):
        render("broken", "{{", None)


def test_data_factories_validate_and_convert() -> None:
    with pytest.raises(TypeError, match="has no field Prompt"):
        prompt_data(Prompt="old docs")
    media = multimodal_data(Images=[0, {"ID": 3}], Text="t")
    assert _render("{{range .Images}}<{{add1 .ID}}>{{end}}{{.Text}}", media) == "<1><4>t"
    legacy = chat_message_data(FunctionCall={"name": "f", "arguments": "{}"})
    assert _render('{{index .FunctionCall "name"}} {{.FunctionCall.name}}', legacy) == "f f"
