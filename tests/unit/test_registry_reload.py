"""ModelRegistry.reload (the models folder changed under a running server), with a fake engine:
what is unloaded, when, and the races with loads and unloads that run at the same time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from pylocalai.config.model_config import ModelCatalog, ModelConfig
from pylocalai.engine.registry import EngineDefaults, ModelRegistry


class FakeLlm:
    def __init__(self, cfg: ModelConfig, close_s: float) -> None:
        self.cfg, self.closed, self.close_s = cfg, 0, close_s

    def close(self) -> None:
        time.sleep(self.close_s)
        self.closed += 1


def registry(tmp_path: Path, *cfgs: ModelConfig, close_s: float = 0.0) -> ModelRegistry:
    reg = ModelRegistry(catalog(tmp_path, *cfgs), EngineDefaults(), max_loaded=4)

    def load(cfg: ModelConfig) -> Any:
        time.sleep(0.2)
        return FakeLlm(cfg, close_s if cfg.name == "a" else 0.0)

    reg._load_sync = load  # type: ignore[method-assign]
    return reg


def catalog(tmp_path: Path, *cfgs: ModelConfig) -> ModelCatalog:
    c = ModelCatalog(tmp_path)
    c.configs.update({cfg.name: cfg for cfg in cfgs})
    return c


def configs(tmp_path: Path, name: str) -> tuple[ModelConfig, ModelConfig]:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"weights")
    return ModelConfig(name, path), ModelConfig(name, path, context_size=512)


def test_only_changed_models_unload_and_busy_ones_wait_for_their_request(tmp_path: Path) -> None:
    a1, a2 = configs(tmp_path, "a")
    b1, b2 = configs(tmp_path, "b")
    c1, _ = configs(tmp_path, "c")

    async def main() -> None:
        reg = registry(tmp_path, a1, b1, c1)
        old_a, old_b = await reg._get(a1), await reg._get(b1)
        await reg._get(c1)
        async with reg.use(b1):
            await reg.reload(catalog(tmp_path, a2, b2))
            assert old_a.llm.closed == 1 and old_b.llm.closed == 0  # b is busy: closed when it is done
            assert reg.loaded() == []  # c went away, a and b changed
        assert old_b.llm.closed == 1
        async with reg.use(reg.resolve("a")) as e:
            assert e.config == a2 and e is not old_a

    trio.run(main)


def test_a_replaced_model_file_unloads_the_model(tmp_path: Path) -> None:
    a1, _ = configs(tmp_path, "a")

    async def main() -> None:
        reg = registry(tmp_path, a1)
        old = await reg._get(a1)
        await reg.reload(catalog(tmp_path, a1))
        assert reg.loaded() == ["a"]  # same config, same file: kept
        new_file = tmp_path / "new.gguf"
        new_file.write_bytes(b"new weights")
        new_file.replace(a1.model_path)  # as a gallery download installs it
        await reg.reload(catalog(tmp_path, a1))
        assert reg.loaded() == [] and old.llm.closed == 1

    trio.run(main)


def test_a_model_that_was_loading_during_a_reload_is_not_kept(tmp_path: Path) -> None:
    a1, a2 = configs(tmp_path, "a")

    async def main() -> None:
        reg = registry(tmp_path, a1)
        got: list[Any] = []

        async def request() -> None:
            async with reg.use(a1) as e:
                got.append(e)

        async with trio.open_nursery() as n:
            n.start_soon(request)  # loading the old config
            await trio.sleep(0.05)
            await reg.reload(catalog(tmp_path, a2))
        assert got[0].config == a1 and got[0].llm.closed == 1  # served its request, then closed
        assert reg.loaded() == []
        async with reg.use(reg.resolve("a")) as e:
            assert e.config == a2

    trio.run(main)


def test_a_reload_racing_an_unload(tmp_path: Path) -> None:
    a1, a2 = configs(tmp_path, "a")
    b1, b2 = configs(tmp_path, "b")

    async def main() -> None:
        reg = registry(tmp_path, a1, b1, close_s=0.5)  # a closes slowly: the reload waits on it
        await reg._get(a1)
        old_b = await reg._get(b1)
        new_b: list[Any] = []

        async def other() -> None:
            await trio.sleep(0.05)
            await reg.unload("b")  # the idle unloader, or room for another model
            new_b.append(await reg._get(b2))  # a request loads b's new config

        async with trio.open_nursery() as n:
            n.start_soon(other)
            await reg.reload(catalog(tmp_path, a2, b2))
        assert old_b.llm.closed == 1 and new_b[0].llm.closed == 0
        assert reg._loaded["b"] is new_b[0]

    trio.run(main)
