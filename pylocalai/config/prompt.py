"""Prompts from LocalAI Go templates: chat (per-message + whole chat), completion and edit.

Follows LocalAI's TemplateMessages: each message through `template.chat_message` (an empty result
drops it; a failing render falls back to the roles prefix), joined with
`join_chat_messages_by_character` (default newline), then `template.function` (when tools are in
use and it is set) or `template.chat` with `.Input`. Models without Go templates are rendered by
the engine's jinja template instead (see ModelConfig.uses_jinja).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from pylocalai.config._govalue import chat_message_data, multimodal_data, prompt_data
from pylocalai.config.gotemplate import TemplateError, render
from pylocalai.config.model_config import ModelConfig
from pylocalai.engine.media import MEDIA_MARKER
from pylocalai.errors import InvalidRequestError

log = logging.getLogger(__name__)


def message_text(content: Any, param: str = "messages") -> str:
    """OpenAI message content: a string, or parts of which the text ones are concatenated."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequestError("content parts must be objects with a type", param=param)
            if part["type"] in ("text", "input_text", "output_text"):
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError("a text part needs a string 'text'", param=param)
                out.append(part["text"])
        return "".join(out)
    raise InvalidRequestError("message content must be a string or an array of parts", param=param)


# LocalAI's default multimodal template: a message's media markers before its text.
DEFAULT_MULTIMODAL = (
    "{{ range .Audio }}<__media__>{{end}}{{ range .Images }}<__media__>{{end}}"
    "{{ range .Video }}[vid-{{.ID}}]{{end}}{{.Text}}"
)


def media_in_prompt_order(msg: dict[str, Any]) -> list[Any]:
    """A message's media in the order the Go templates' markers take them: audio, then images."""
    media = list(msg.get("media") or ())
    return [m for m in media if m.kind == "audio"] + [m for m in media if m.kind != "audio"]


def render_chat(cfg: ModelConfig, messages: Sequence[dict[str, Any]], *, functions: Sequence[dict[str, Any]] = (),
                use_functions: bool = False, reasoning_effort: str = "", metadata: dict[str, str] | None = None) -> str:
    t = cfg.template
    rendered: list[str] = []
    suppress_system = False
    n = len(messages)
    counts = {"image": 0, "audio": 0}  # running media indices across the chat (the templates' .ID)
    for i, msg in enumerate(messages):
        role = str(msg.get("role", ""))
        text = message_text(msg.get("content"))
        if msg.get("media"):
            ids: dict[str, list[int]] = {"image": [], "audio": []}
            for item in media_in_prompt_order(msg):
                ids[item.kind].append(counts[item.kind])
                counts[item.kind] += 1
            data = multimodal_data(Text=text.replace(MEDIA_MARKER, ""), Images=ids["image"], Audio=ids["audio"])
            text = render(f"{cfg.name}:multimodal", t.multimodal or DEFAULT_MULTIMODAL, data)
        calls = msg.get("tool_calls") or None
        legacy = msg.get("function_call")
        role_name = role
        if (calls or legacy) and role == "assistant" and "assistant_function_call" in cfg.roles:
            role_name = "assistant_function_call"
        out: str | None = None
        if t.chat_message:
            data = chat_message_data(
                SystemPrompt=cfg.system_prompt, Role=cfg.roles.get(role_name, ""), RoleName=role_name,
                FunctionName=str(msg.get("name") or ""), Content=text, MessageIndex=i,
                Function=use_functions and i == n - 1, FunctionCall=calls if calls else legacy,
                LastMessage=i == n - 1,
            )
            try:
                out = render(f"{cfg.name}:chat_message", t.chat_message, data)
            except TemplateError as exc:
                log.warning("chat_message template of %s failed, using roles: %s", cfg.name, exc)
        if out is None:
            prefix = cfg.roles.get(role_name, "")
            out = prefix + text if text else ""
            if calls or legacy:
                js = json.dumps(calls if calls else legacy)
                out += ("\n" if out else "") + (prefix + " " + js if prefix else js)
            if role == "system":
                suppress_system = True
        if out:
            rendered.append(out)
    joiner = "\n" if t.join_chat_messages_by_character is None else t.join_chat_messages_by_character
    joined = joiner.join(rendered)
    template = t.function if (use_functions and t.function) else t.chat
    if not template:
        return joined
    data = prompt_data(Input=joined, SystemPrompt=cfg.system_prompt, SuppressSystemPrompt=suppress_system,
                       Functions=list(functions) if functions else None, ReasoningEffort=reasoning_effort,
                       Metadata=metadata)
    return render(f"{cfg.name}:{'function' if template is t.function else 'chat'}", template, data)


def render_completion(cfg: ModelConfig, prompt: str, *, reasoning_effort: str = "", metadata: dict[str, str] | None = None) -> str:
    if not cfg.template.completion:
        return prompt
    data = prompt_data(Input=prompt, SystemPrompt=cfg.system_prompt, ReasoningEffort=reasoning_effort, Metadata=metadata)
    return render(f"{cfg.name}:completion", cfg.template.completion, data)


def render_edit(cfg: ModelConfig, instruction: str, text: str) -> str:
    if not cfg.template.edit:
        return f"{instruction}\n\n{text}" if instruction else text
    data = prompt_data(Input=text, Instruction=instruction, SystemPrompt=cfg.system_prompt)
    return render(f"{cfg.name}:edit", cfg.template.edit, data)
