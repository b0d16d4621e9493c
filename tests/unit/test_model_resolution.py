"""Which model serves a request: the name asked for (an alias is served by its target, a disabled
model refused), a bearer token naming a model, the only model, else LocalAI's usecase default."""

from __future__ import annotations

from pathlib import Path

import pytest

from pylocalai.config.model_config import load_catalog
from pylocalai.engine.registry import EngineDefaults, ModelRegistry
from pylocalai.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
)

CONFIGS = """
- {name: zeta, parameters: {model: m.gguf}, template: {completion: "Q: {{.Input}}"}}
- {name: beta, parameters: {model: m.gguf}}
- {name: alpha, parameters: {model: m.gguf}, disabled: true}
- {name: aardvark, alias: beta}
- {name: embedder, parameters: {model: m.gguf}, embeddings: true}
- {name: editor, parameters: {model: m.gguf}, known_usecases: [FLAG_EDIT, completion]}
- {name: off-alias, alias: beta, disabled: true}
- {name: dangling, alias: nowhere}
- {name: chain, alias: aardvark}
- {name: odd, parameters: {model: m.gguf}, known_usecases: [tts], template: {completion: "{{.Input}}"}}
- {name: general, parameters: {model: m.gguf}, known_usecases: [llm], embeddings: true}
- {name: empty-alias, alias: "", parameters: {model: m.gguf}, template: {completion: "{{.Input}}"}}
"""


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "loose.gguf").write_bytes(b"")
    (tmp_path / "models.yaml").write_text(CONFIGS)
    return ModelRegistry(load_catalog(tmp_path), EngineDefaults())


def test_aliases_are_checked_when_the_folder_loads(reg: ModelRegistry) -> None:
    errors = reg.catalog.errors
    assert any("dangling" in e and "'nowhere' is not a configured model" in e for e in errors)
    assert any("chain" in e and "is an alias itself" in e for e in errors)
    assert "dangling" not in reg.names() and "chain" not in reg.names() and "aardvark" in reg.names()
    assert "empty-alias" in reg.names() and not reg.catalog.configs["empty-alias"].alias  # an empty alias is none


def test_usecases_are_declared_and_guessed(reg: ModelRegistry) -> None:
    cfgs = reg.catalog.configs
    assert cfgs["odd"].known_usecases == ("tts",)  # one this server does not serve: kept, not an error
    assert not cfgs["odd"].has_usecase("chat") and cfgs["odd"].has_usecase("completion")  # a completion template only
    assert cfgs["general"].known_usecases == ("chat", "completion", "edit")  # llm
    assert cfgs["general"].has_usecase("chat")  # declared, though an embeddings model
    assert cfgs["editor"].has_usecase("chat")  # declared edit and completion, plus the guessed chat (no template)
    assert cfgs["zeta"].has_usecase("completion") and not cfgs["zeta"].has_usecase("chat")


def test_a_named_model(reg: ModelRegistry) -> None:
    assert reg.resolve("beta").name == "beta"
    assert reg.resolve("aardvark").name == "beta"  # the alias's target serves
    assert reg.resolve("loose.gguf").name == "loose.gguf"
    with pytest.raises(PermissionDeniedError, match="'alpha' is disabled"):
        reg.resolve("alpha")
    with pytest.raises(PermissionDeniedError, match="'off-alias' is disabled"):
        reg.resolve("off-alias")
    with pytest.raises(ModelNotFoundError):
        reg.resolve("gamma")
    assert reg.resolve(None, bearer="aardvark").name == "beta"


def test_lacking_a_name_the_first_model_with_the_usecase(reg: ModelRegistry) -> None:
    # by name: alpha is disabled, aardvark an alias, beta has no completion template
    assert reg.resolve(None, usecase="chat").name == "beta"
    assert reg.resolve(None, usecase="completion").name == "editor"  # declared (before 'empty-alias' and 'general')
    assert reg.resolve(None, usecase="edit").name == "editor"
    assert reg.resolve(None, usecase="chat").name == "beta"
    assert reg.resolve(None, usecase="embeddings").name == "embedder"
    assert not reg.catalog.configs["embedder"].has_usecase("chat")
    with pytest.raises(InvalidRequestError, match="several models"):
        reg.resolve(None)  # tokenize and the like: no usecase, no default


def test_loose_files_are_never_the_default(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    reg = ModelRegistry(load_catalog(tmp_path), EngineDefaults())
    with pytest.raises(InvalidRequestError, match="none is configured for chat"):
        reg.resolve(None, usecase="chat")
    (tmp_path / "b.gguf").unlink()
    assert ModelRegistry(load_catalog(tmp_path), EngineDefaults()).resolve(None, usecase="chat").name == "a.gguf"
