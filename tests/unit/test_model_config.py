"""LocalAI YAML configs: loading, errors that name file and field, options, templates, prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pylocalai.config.model_config import ConfigError, load_catalog, parse_options
from pylocalai.config.prompt import render_chat, render_completion, render_edit


def write(d: Path, name: str, text: str) -> None:
    (d / name).write_text(text)


def test_single_and_list_configs_and_loose_gguf(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\nparameters: {model: a.gguf, temperature: 0.2}\ncontext_size: 2048\n")
    write(tmp_path, "many.yml", "- name: b\n  parameters: {model: b.gguf}\n- name: c\n  parameters: {model: c.gguf}\n")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "loose.gguf").write_bytes(b"")
    write(tmp_path, ".hidden.yaml", "name: hidden\nparameters: {model: a.gguf}\n")
    cat = load_catalog(tmp_path)
    assert cat.names() == ["a", "b", "c", "loose.gguf"]  # a.gguf is a's file, not listed again
    assert cat.configs["a"].context_size == 2048 and cat.configs["a"].parameters == {"temperature": 0.2}
    assert cat.errors == []


def test_yaml_reads_as_localai_does_only_true_and_false_are_booleans(tmp_path: Path) -> None:
    # PyYAML's default (YAML 1.1) made `name: on` a boolean (and the config an error) and the
    # stopword `no` False; Go's decoder keeps them strings. Boolean fields still take yes/no/on/off.
    write(tmp_path, "on.yaml", "name: on\nparameters: {model: m.gguf}\nstopwords: [no, 42, '<|im_end|>']\n"
                               "mmap: no\nf16: yes\nmmlock: on\n")
    write(tmp_path, "n.yaml", "name: 123\nparameters: {model: m.gguf}\nmmap: true\n")
    write(tmp_path, "bad.yaml", "name: bad\nparameters: {model: m.gguf}\nf16: maybe\n")
    cat = load_catalog(tmp_path)
    on = cat.configs["on"]
    assert on.stopwords == ("no", "42", "<|im_end|>")
    assert (on.mmap, on.f16, on.mlock) == (False, True, True)
    assert cat.configs["123"].mmap is True
    assert "bad" not in cat.configs and any("bad.yaml" in e and "'f16'" in e for e in cat.errors)


def test_a_broken_config_is_reported_by_file_and_field_and_skipped(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", "name: good\nparameters: {model: g.gguf}\n")
    write(tmp_path, "bad-yaml.yaml", "name: [unclosed\n")
    write(tmp_path, "no-model.yaml", "name: nomodel\n")
    write(tmp_path, "bad-ctx.yaml", "name: badctx\nparameters: {model: x.gguf}\ncontext_size: lots\n")
    write(tmp_path, "dup.yaml", "name: good\nparameters: {model: g.gguf}\n")
    write(tmp_path, "escape.yaml", "name: esc\nparameters: {model: /etc/passwd}\n")
    cat = load_catalog(tmp_path)
    assert cat.names() == ["good"]
    text = "\n".join(cat.errors)
    assert "bad-yaml.yaml: not valid YAML" in text
    assert "no-model.yaml (nomodel): field 'parameters.model'" in text
    assert "bad-ctx.yaml (badctx): field 'context_size'" in text
    assert "good.yaml: model name 'good' is already defined in dup.yaml" in text  # files load in name order
    assert "escape.yaml (esc): model file '/etc/passwd' must be a relative path" in text


def test_template_may_name_a_tmpl_file(tmp_path: Path) -> None:
    write(tmp_path, "chatml.tmpl", "{{.Input}}\n<|im_start|>assistant\n")
    write(tmp_path, "m.yaml", "name: m\nparameters: {model: m.gguf}\ntemplate: {chat: chatml}\n")
    cfg = load_catalog(tmp_path).configs["m"]
    assert cfg.template.chat == "{{.Input}}\n<|im_start|>assistant\n"
    assert not cfg.uses_jinja


def test_options_split_on_the_first_colon_and_aliases() -> None:
    o = parse_options(["parallel:3", "rpc_servers:h1:50052,h2:50052", "jinja", "sps:0.5", "unified_kv:yes",
                       "continuous_batching:off", "swa_full:true", "check_tensors:1", "no_op_offload",
                       "context_shift:on", "warmup:false", "cache_ram:0"], "x.yaml", env={})
    assert o.parallel == 3 and o.rpc_servers == ("h1:50052", "h2:50052")
    assert o.use_jinja and o.kv_unified and o.swa_full and o.check_tensors and o.no_op_offload and o.context_shift
    assert o.slot_prompt_similarity == 0.5 and not o.cont_batching and not o.warmup


def test_environment_fallbacks_apply_only_when_the_option_is_absent() -> None:
    env = {"LLAMACPP_PARALLEL": "6", "LLAMACPP_GRPC_SERVERS": "a:1,b:2"}
    assert parse_options([], "x", env=env).parallel == 6
    assert parse_options([], "x", env=env).rpc_servers == ("a:1", "b:2")
    assert parse_options(["parallel:2"], "x", env=env).parallel == 2


@pytest.mark.parametrize(("option", "message"), [
    ("nonsense:1", "unknown option 'nonsense'"),
    ("parallel:0", "at least 1"),
    ("sps:2", "within"),
    ("cache_ram:-2", "at least -1"),
    ("cache_reuse:256", "KV-shifting chunk reuse"),
    ("fit:true", "fitting to device memory"),
    ("ctx_checkpoints:-1", "at least 0"),
    ("swa_full:maybe", "expected a boolean"),
])
def test_options_without_an_effect_are_rejected_with_the_reason(option: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options([option], "m.yaml", env={})


def test_context_checkpoints_option() -> None:
    assert parse_options([], "x", env={}).n_ctx_checkpoints == 32  # LocalAI's default
    assert parse_options(["ctx_checkpoints:4"], "x", env={}).n_ctx_checkpoints == 4
    assert parse_options(["n_ctx_checkpoints:0"], "x", env={}).n_ctx_checkpoints == 0


def test_cache_ram_option() -> None:
    assert parse_options([], "x", env={}).cache_ram == 8192  # llama-server's default
    assert parse_options(["cache_ram:0"], "x", env={}).cache_ram == 0
    assert parse_options(["cache_ram:-1"], "x", env={}).cache_ram == -1


def test_ik_llama_cpp_knobs_parse_under_ik_and_their_own_names() -> None:
    o = parse_options(["rtr", "amb:512", "fmoe:off", "ser:4,0.5", "mla:2", "khad:true", "graph_reuse:no",
                       "parallel:2"], "ik.yaml", env={})
    assert o.parallel == 2
    assert dict(o.engine) == {"repack_tensors": True, "attn_max_batch": 512, "fused_moe_up_gate": False,
                              "min_experts": 4, "thresh_experts": 0.5, "mla": 2, "mla_attn": 2,
                              "k_cache_hadamard": True, "graph_reuse": False}


@pytest.mark.parametrize(("option", "message"), [
    ("amb:lots", "attn_max_batch expects an integer"),
    ("amb:-1", "must not be negative"),
    ("rtr:maybe", "repack_tensors expects true or false"),
    ("ser:4", "ser expects MIN,THRESH"),
])
def test_bad_ik_knob_values_name_the_option(option: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options([option], "ik.yaml", env={})


def test_ik_knobs_need_the_ik_backend(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    write(tmp_path, "up.yaml", "name: up\nparameters: {model: m.gguf}\noptions: [rtr]\n")
    write(tmp_path, "ik.yaml", "name: ik\nbackend: ik-llama\nparameters: {model: m.gguf}\noptions: [rtr, 'amb:64']\n")
    cat = load_catalog(tmp_path)
    assert cat.names() == ["ik"]
    assert dict(cat.configs["ik"].options.engine) == {"repack_tensors": True, "attn_max_batch": 64}
    assert any("up.yaml" in e and "'repack_tensors' is an ik_llama.cpp option" in e for e in cat.errors)


CHATML = {
    "chat_message": "<|im_start|>{{ .RoleName }}\n{{ .Content }}<|im_end|>",
    "chat": "{{.Input}}\n<|im_start|>assistant\n",
}


def _cfg(tmp_path: Path, **template: str) -> object:
    import json

    write(tmp_path, "m.yaml", json.dumps({"name": "m", "parameters": {"model": "m.gguf"}, "template": template,
                                          "system_prompt": "Be brief.", "roles": {"user": "USER: ", "assistant": "BOT: "}}))
    return load_catalog(tmp_path).configs["m"]


def test_chat_through_chat_message_and_chat_templates(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **CHATML)
    out = render_chat(cfg, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])  # type: ignore[arg-type]
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_falls_back_to_role_prefixes(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, chat="{{if not .SuppressSystemPrompt}}{{.SystemPrompt}}\n{{end}}{{.Input}}\nBOT:")
    out = render_chat(cfg, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])  # type: ignore[arg-type]
    assert out == "Be brief.\nUSER: Hi\nBOT: Hello\nBOT:"


def test_empty_chat_message_output_drops_the_message(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, chat_message="{{if ne .RoleName \"system\"}}{{.RoleName}}: {{.Content}}{{end}}", chat="{{.Input}}")
    out = render_chat(cfg, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])  # type: ignore[arg-type]
    assert out == "user: Hi"


def test_function_template_sees_the_tools(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, chat="{{.Input}}", function="Tools:{{range .Functions}} {{.Name}}{{end}}\n{{.Input}}")
    fns = [{"name": "get_weather", "parameters": {"type": "object"}}, {"name": "get_time"}]
    out = render_chat(cfg, [{"role": "user", "content": "Hi"}], functions=fns, use_functions=True)  # type: ignore[arg-type]
    assert out == "Tools: get_weather get_time\nUSER: Hi"


def test_completion_and_edit_templates(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, completion="Q: {{.Input}}\nA:", edit="{{.Instruction}}\n---\n{{.Input}}")
    assert render_completion(cfg, "2+2?") == "Q: 2+2?\nA:"  # type: ignore[arg-type]
    assert render_edit(cfg, "Fix it", "helo") == "Fix it\n---\nhelo"  # type: ignore[arg-type]
