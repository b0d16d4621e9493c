"""The chat layer shared by the Python API and every protocol: template rendering, the grammar that
constrains the answer, and parsing the answer back into content, reasoning and tool calls.

Tool calling is one mechanism:
- `auto`: the model's own template renders the tools and llama.cpp's chat library gives a lazy
  grammar that engages once the model starts its native call syntax; calls are parsed back with the
  template's parser. The model may answer in text instead.
- `required` or a named function: decoding is constrained by a grammar made from the tools'
  JSON schemas (`{"name": ..., "arguments": {...}}`, or a list of them when parallel calls are
  allowed), so even a tiny model emits a valid call; the JSON is parsed back directly.
- `none`: tools are not offered.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pylocalai.errors import EngineError, InvalidRequestError


class ChatEngine(Protocol):
    def render_chat(self, messages: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]] | None,
                    tool_choice: str, parallel_tool_calls: bool, json_schema: dict[str, Any] | None,
                    enable_thinking: bool, template_kwargs: dict[str, Any] | None) -> dict[str, Any]: ...
    def schema_grammar(self, schema: dict[str, Any]) -> str: ...
    def parse_rendered(self, text: str, rendered: dict[str, Any], *, is_partial: bool) -> dict[str, Any]: ...
    def single_token_ids(self, texts: Sequence[str]) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class ChatPlan:
    """How to run one chat turn: the prompt, sampling additions, and how to read the answer."""

    prompt: str
    sampling: dict[str, Any]  # grammar, grammar_kind, triggers, preserved tokens, extra stops
    rendered: dict[str, Any]
    forced_tools: bool = False  # the answer is the forced-call JSON
    tool_names: tuple[str, ...] = ()

    def sampling_with(self, user: dict[str, Any]) -> dict[str, Any]:
        """The caller's sampling fields over the plan's: stop strings are joined (caller's first), and
        a grammar the caller gives replaces the plan's whole grammar setup."""
        out = dict(self.sampling)
        if user.get("grammar"):
            for key in ("grammar_kind", "generation_prompt", "grammar_lazy", "grammar_triggers"):
                out.pop(key, None)
        out.update({k: v for k, v in user.items() if k != "stop"})
        stop = user.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        out["stop"] = tuple(dict.fromkeys([*stop, *self.sampling.get("stop", ())]))
        return out


def tool_name(tool: dict[str, Any]) -> str:
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("every tool needs a function name", param="tools")
    return name


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise InvalidRequestError("tool parameters must be a JSON schema object", param="tools")
    return params


def forced_call_schema(tools: Sequence[dict[str, Any]], *, parallel: bool) -> dict[str, Any]:
    """JSON schema of one call (or a non-empty list of calls) to one of the tools."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool_name(t)}, "arguments": _parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    one = calls[0] if len(calls) == 1 else {"oneOf": calls}
    return {"type": "array", "items": one, "minItems": 1} if parallel else one


def select_tools(tools: Sequence[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    """Normalize tool_choice: returns (tools offered, 'auto' | 'required' | 'none')."""
    tool_list = list(tools or [])
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        name = fn.get("name")
        matching = [t for t in tool_list if tool_name(t) == name]
        if not matching:
            raise InvalidRequestError(f"tool_choice names an unknown function {name!r}", param="tool_choice")
        return matching, "required"
    if choice not in ("auto", "required", "none"):
        raise InvalidRequestError("tool_choice must be auto, required, none or a named function", param="tool_choice")
    if choice == "required" and not tool_list:
        raise InvalidRequestError("tool_choice is required but no tools were given", param="tool_choice")
    if choice == "none":
        return [], "none"
    return tool_list, choice if tool_list else "auto"


def plan_chat(
    engine: ChatEngine,
    messages: Sequence[dict[str, Any]],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = "auto",
    parallel_tool_calls: bool = False,
    json_schema: dict[str, Any] | None = None,
    enable_thinking: bool = True,
    template_kwargs: dict[str, Any] | None = None,
    user_grammar: str = "",
    prompt: str | None = None,
) -> ChatPlan:
    """prompt: a prompt already rendered by the model config's Go templates (LocalAI mode); the
    model's jinja template renders the messages otherwise."""
    offered, choice = select_tools(tools, tool_choice)
    forced = choice == "required"
    if prompt is None:
        rendered = engine.render_chat(
            messages, tools=offered or None, tool_choice="auto" if forced else choice,
            parallel_tool_calls=parallel_tool_calls,
            json_schema=None if forced or user_grammar else json_schema,  # a user grammar wins
            enable_thinking=enable_thinking, template_kwargs=template_kwargs,
        )
    else:
        rendered = {"prompt": prompt, "grammar": "", "grammar_lazy": False, "grammar_triggers": [],
                    "preserved_tokens": [], "additional_stops": [], "format": 0, "parser": b"",
                    "generation_prompt": "", "go_template": True}
    sampling: dict[str, Any] = {}
    if user_grammar:
        sampling.update(grammar=user_grammar, grammar_kind="user")
    elif json_schema is not None and not forced and rendered.get("go_template"):
        sampling.update(grammar=engine.schema_grammar(json_schema), grammar_kind="user")
    elif forced:
        # our own grammar: the answer is exactly the call JSON, from the first token on
        sampling.update(grammar=engine.schema_grammar(forced_call_schema(offered, parallel=parallel_tool_calls)),
                        grammar_kind="user")
    elif rendered["grammar"]:
        sampling.update(
            grammar=rendered["grammar"],
            grammar_kind="tool_calls" if offered else "output_format",
            generation_prompt=rendered["generation_prompt"],
            grammar_lazy=rendered["grammar_lazy"],
            grammar_triggers=[tuple(t) for t in rendered["grammar_triggers"]],
        )
    preserved = engine.single_token_ids(rendered["preserved_tokens"])
    if preserved:
        sampling["preserved_tokens"] = preserved
    if rendered["additional_stops"]:
        sampling["stop"] = list(rendered["additional_stops"])
    return ChatPlan(rendered["prompt"], sampling, rendered, forced_tools=forced,
                    tool_names=tuple(tool_name(t) for t in offered))


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_answer(engine: ChatEngine, plan: ChatPlan, text: str, *, is_partial: bool = False) -> dict[str, Any]:
    """The assistant message in OpenAI shape: content, reasoning_content, tool_calls (with ids)."""
    if plan.forced_tools:
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": _forced_calls(text, plan)}
    elif plan.rendered.get("go_template"):
        # LocalAI's Go-template mode: a call is the JSON the tool prompt asked for; anything else is text
        calls = _forced_calls(text.strip(), plan) if plan.tool_names and text.lstrip().startswith(("{", "[")) else []
        message = {"role": "assistant", "content": None if calls else text}
        if calls:
            message["tool_calls"] = calls
    else:
        try:
            message = engine.parse_rendered(text, plan.rendered, is_partial=is_partial)
        except EngineError:
            # output that does not follow the template's format (cut short, or steered elsewhere):
            # it is plain text, not an error
            message = {"content": text}
        message["role"] = "assistant"
        if not plan.tool_names:
            message.pop("tool_calls", None)
    for call in message.get("tool_calls") or []:
        call.setdefault("type", "function")
        if not call.get("id"):
            call["id"] = new_call_id()
    return message


def _json_items(text: str) -> list[Any]:
    """The call object, or the complete elements of a call list (a list cut by max_tokens keeps
    the calls that were finished)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        pass
    else:
        return data if isinstance(data, list) else [data]
    body = text.lstrip()
    if not body.startswith("["):
        return []
    dec = json.JSONDecoder()
    items, i = [], 1
    while True:
        while i < len(body) and body[i] in " \t\r\n,":
            i += 1
        try:
            item, i = dec.raw_decode(body, i)
        except json.JSONDecodeError:
            return items
        items.append(item)


def _forced_calls(text: str, plan: ChatPlan) -> list[dict[str, Any]]:
    items = _json_items(text)
    calls = []
    for item in items:
        if isinstance(item, dict) and item.get("name") in plan.tool_names:
            calls.append({"id": new_call_id(), "type": "function",
                          "function": {"name": item["name"], "arguments": json.dumps(item.get("arguments", {}))}})
    return calls


@dataclass(slots=True)
class CallDelta:
    index: int
    id: str | None = None  # set on the call's first delta, with its name
    name: str | None = None
    arguments: str = ""  # the next piece of the JSON arguments string


@dataclass(slots=True)
class AnswerDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[CallDelta] | None = None


class AnswerStream:
    """Turns the growing text of one answer into reasoning, content and tool-call deltas, the same
    way for every protocol. Plain answers pass through untouched; answers that may hold tool calls
    or reasoning are re-parsed as they grow (llama.cpp's parser, partial mode), so call syntax never
    leaks into content; forced calls and Go-template tool answers are read once at the end."""

    def __init__(self, engine: ChatEngine, plan: ChatPlan) -> None:
        self._engine = engine
        self._plan = plan
        jinja = not plan.rendered.get("go_template")
        structured = plan.sampling.get("grammar_kind") == "output_format"  # JSON that may come fenced
        self.mode = ("buffer" if plan.tool_names and (plan.forced_tools or not jinja)
                     else "live" if jinja and (plan.tool_names or structured or plan.rendered.get("supports_thinking"))
                     else "plain")
        self.text = ""
        self._content = ""
        self._reasoning = ""
        self._ids: list[str] = []
        self._args: list[str] = []
        self.message: dict[str, Any] | None = None

    def feed(self, delta: str) -> AnswerDelta:
        self.text += delta
        if self.mode == "plain":
            self._content += delta
            return AnswerDelta(content=delta)
        if self.mode == "buffer" or not delta:
            return AnswerDelta()
        return self._diff(parse_answer(self._engine, self._plan, self.text, is_partial=True))

    def finish(self) -> AnswerDelta:
        """The last deltas; afterwards `message` holds the whole parsed answer."""
        if self.mode == "plain":
            self.message = {"role": "assistant", "content": self.text}
            return AnswerDelta()
        self.message = parse_answer(self._engine, self._plan, self.text)
        out = self._diff(self.message)
        for call, streamed_id in zip(self.message.get("tool_calls") or [], self._ids, strict=False):
            call["id"] = streamed_id  # the ids already sent stay the calls' ids
        return out

    def _diff(self, msg: dict[str, Any]) -> AnswerDelta:
        out = AnswerDelta()
        reasoning = msg.get("reasoning_content") or ""
        if reasoning.startswith(self._reasoning) and len(reasoning) > len(self._reasoning):
            out.reasoning, self._reasoning = reasoning[len(self._reasoning):], reasoning
        content = msg.get("content") or ""
        if content.startswith(self._content) and len(content) > len(self._content):
            out.content, self._content = content[len(self._content):], content
        calls: list[CallDelta] = []
        for i, call in enumerate(msg.get("tool_calls") or []):
            name = call["function"].get("name") or ""
            args = call["function"].get("arguments") or ""
            if not name:
                break
            if i >= len(self._ids):
                self._ids.append(call.get("id") or new_call_id())
                self._args.append("")
                calls.append(CallDelta(i, self._ids[i], name))
            if args.startswith(self._args[i]) and len(args) > len(self._args[i]):
                calls.append(CallDelta(i, arguments=args[len(self._args[i]):]))
                self._args[i] = args
        out.calls = calls or None
        return out

    @property
    def call_ids(self) -> list[str]:
        return list(self._ids)
