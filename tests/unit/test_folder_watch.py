"""What the models-folder watcher compares, and a folder that changes while it is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pylocalai.config.model_config import load_catalog
from pylocalai.server import folder_state


def test_every_kind_of_edit_shows(tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text("name: m\nparameters: {model: sub/m.gguf}\n")
    (tmp_path / "sub").mkdir()
    weights = tmp_path / "sub" / "m.gguf"
    weights.write_bytes(b"1234")
    (tmp_path / "._gallery_m.yaml").write_text("files: []\n")
    (tmp_path / "big.gguf.partial").write_bytes(b"xx")
    before = folder_state(tmp_path, [weights])
    assert [Path(p).name for p, *_ in before] == ["m.yaml", "m.gguf"]  # records and partial downloads aside
    st = cfg.stat()
    cfg.write_text("name: m\nparameters: {model: sub/m.gguz}\n")  # same size ...
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and mtime, as `cp -p` leaves them
    assert folder_state(tmp_path, [weights]) != before  # the change time shows it
    before = folder_state(tmp_path, [weights])
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"5678")
    os.replace(replacement, weights)  # a model file in a subfolder, replaced
    assert folder_state(tmp_path, [weights]) != before
    assert folder_state(tmp_path / "gone") == ()


def test_a_config_removed_while_the_folder_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.yaml").write_text("name: a\nparameters: {model: a.gguf}\n")
    (tmp_path / "b.yaml").write_text("name: b\nparameters: {model: b.gguf}\n")
    real = Path.read_text

    def racing(self: Path, *args: object, **kw: object) -> str:
        if self.name == "a.yaml":
            raise FileNotFoundError(2, "No such file or directory")
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", racing)
    catalog = load_catalog(tmp_path)
    assert catalog.names() == ["b"] and catalog.errors == ["a.yaml: cannot be read: No such file or directory"]
