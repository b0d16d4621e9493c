"""Gallery sources, downloads, indexes, installs and deletes, against a file server on 127.0.0.1."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pylocalai.errors import InvalidRequestError, NotFoundError
from pylocalai.gallery.install import (
    Gallery,
    delete_model,
    find_entry,
    load_index,
    parse_galleries,
    plan_install,
    run_install,
)
from pylocalai.gallery.sources import (
    DownloadCancelled,
    DownloadError,
    download,
    resolve_url,
)
from tests.fileserver import FileServer

MB = 1 << 20


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "srv"
    root.mkdir()
    s = FileServer(root)
    yield s
    s.close()


def blob(root: Path, name: str, size: int, seed: int = 1) -> str:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    (root / name).write_bytes(data[:size])
    return hashlib.sha256(data[:size]).hexdigest()


# ---------------------------------------------------------------- URL schemes

@pytest.mark.parametrize(("uri", "url"), [
    ("github:mudler/LocalAI/gallery/index.yaml@master",
     "https://raw.githubusercontent.com/mudler/LocalAI/master/gallery/index.yaml"),
    ("github://mudler/LocalAI/gallery/chatml.yaml", "https://raw.githubusercontent.com/mudler/LocalAI/main/gallery/chatml.yaml"),
    ("huggingface://TheBloke/Some-GGUF/model.Q4_K_M.gguf",
     "https://huggingface.co/TheBloke/Some-GGUF/resolve/main/model.Q4_K_M.gguf"),
    ("hf://owner/repo/sub/dir/file.gguf@v1.0", "https://huggingface.co/owner/repo/resolve/v1.0/sub/dir/file.gguf"),
    ("hf.co/owner/repo/file.gguf", "https://huggingface.co/owner/repo/resolve/main/file.gguf"),
    ("https://example.org/a.yaml", "https://example.org/a.yaml"),
    ("file:///srv/gallery/index.yaml", "file:///srv/gallery/index.yaml"),
])
def test_uri_schemes_resolve_as_localai_does(uri: str, url: str) -> None:
    assert resolve_url(uri, env={}) == url


def test_hf_endpoint_and_mirror_replace_the_host() -> None:
    assert resolve_url("huggingface://o/r/f.gguf", env={"HF_ENDPOINT": "http://mirror.local/"}) \
        == "http://mirror.local/o/r/resolve/main/f.gguf"
    assert resolve_url("hf://o/r/f.gguf", env={"HF_MIRROR": "http://m2"}) == "http://m2/o/r/resolve/main/f.gguf"


@pytest.mark.parametrize(("uri", "words"), [
    ("oci://registry/model:tag", "not supported"),
    ("ollama://gemma:2b", "not supported"),
    ("github:owner/repo", "owner/repo/path"),
    ("ftp://host/file", "not a URL"),
    ("models/file.gguf", "not a URL"),
])
def test_unusable_uris_are_clear_errors(uri: str, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        resolve_url(uri, env={})


# ---------------------------------------------------------------- downloads

def test_download_checks_sha256_and_keeps_a_matching_file(files: FileServer, tmp_path: Path) -> None:
    sha = blob(files.root, "w.bin", 3 * MB)
    dest = tmp_path / "models" / "w.bin"
    seen: list[tuple[int, int | None]] = []
    assert download(files.url + "/w.bin", dest, sha, env={}, progress=lambda d, t: seen.append((d, t))) is True
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha
    assert seen[-1] == (3 * MB, 3 * MB) and len(seen) >= 3
    assert not dest.with_name("w.bin.partial").exists()
    # already there and matching: no request at all
    assert download(files.url + "/w.bin", dest, sha, env={}) is False
    assert len(files.gets("/w.bin")) == 1
    # there but different: fetched again
    dest.write_bytes(b"corrupted")
    assert download(files.url + "/w.bin", dest, sha.upper(), env={}) is True
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha and len(files.gets("/w.bin")) == 2


def test_a_sha256_mismatch_leaves_nothing_behind(files: FileServer, tmp_path: Path) -> None:
    blob(files.root, "w.bin", MB)
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(files.url + "/w.bin", dest, "0" * 64, env={})
    assert not dest.exists() and not dest.with_name("w.bin.partial").exists()


def test_a_broken_download_resumes_from_where_it_stopped(files: FileServer, tmp_path: Path) -> None:
    sha = blob(files.root, "w.bin", 3 * MB)
    files.cut_after["/w.bin"] = MB
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match="resumes"):
        download(files.url + "/w.bin", dest, sha, env={})
    partial = dest.with_name("w.bin.partial")
    assert partial.stat().st_size == MB and not dest.exists()
    assert download(files.url + "/w.bin", dest, sha, env={}) is True
    assert files.gets("/w.bin")[-1].range == f"bytes={MB}-"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha and not partial.exists()


def test_a_server_without_ranges_restarts_the_file(files: FileServer, tmp_path: Path) -> None:
    sha = blob(files.root, "w.bin", 2 * MB)
    dest = tmp_path / "w.bin"
    dest.with_name("w.bin.partial").write_bytes(b"stale bytes from another file")
    files.ignore_ranges = True
    assert download(files.url + "/w.bin", dest, sha, env={}) is True
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha


def test_a_whole_partial_from_another_file_is_dropped(files: FileServer, tmp_path: Path) -> None:
    sha = blob(files.root, "w.bin", MB)
    dest = tmp_path / "w.bin"
    dest.with_name("w.bin.partial").write_bytes(b"x" * (MB + 10))  # longer than the file: 416
    assert download(files.url + "/w.bin", dest, sha, env={}) is True
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha


def test_cancelling_keeps_the_partial_for_the_next_try(files: FileServer, tmp_path: Path) -> None:
    sha = blob(files.root, "w.bin", 3 * MB)
    dest = tmp_path / "w.bin"
    calls = iter(range(100))
    with pytest.raises(DownloadCancelled):
        download(files.url + "/w.bin", dest, sha, env={}, cancelled=lambda: next(calls) >= 1)
    have = dest.with_name("w.bin.partial").stat().st_size
    assert 0 < have < 3 * MB  # stopped after the first read
    assert download(files.url + "/w.bin", dest, sha, env={}) is True
    assert files.gets("/w.bin")[-1].range == f"bytes={have}-"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha


def test_missing_files_and_empty_sha256(files: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(files.url + "/nope.bin", tmp_path / "nope.bin", "", env={})
    blob(files.root, "w.bin", 1000)
    assert download(files.url + "/w.bin", tmp_path / "w.bin", "", env={}) is True  # accepted, with a warning


def test_hf_token_goes_to_the_hf_endpoint_only(files: FileServer, tmp_path: Path) -> None:
    (files.root / "o/r/resolve/main").mkdir(parents=True)
    blob(files.root, "o/r/resolve/main/f.gguf", 100)
    env = {"HF_ENDPOINT": files.url, "HF_TOKEN": "secret"}
    download("huggingface://o/r/f.gguf", tmp_path / "f.gguf", "", env=env)
    assert files.hits[-1].authorization == "Bearer secret"
    download(files.url + "/o/r/resolve/main/f.gguf", tmp_path / "g.gguf", "", env={"HF_TOKEN": "secret"})
    assert files.hits[-1].authorization is None


# ---------------------------------------------------------------- galleries and indexes

INDEX = """
- &base
  name: tiny-chat
  url: {url}/tiny.yaml
  description: a tiny chat model
  license: mit
  tags: [llm, gguf]
  files:
  - filename: w.bin
    uri: {url}/w.bin
    sha256: {sha}
- !!merge <<: *base
  name: Tiny-Chat-Hot
  overrides:
    parameters: {{temperature: 0.9}}
    foo: bar
- name: broken entry without anything
- not a mapping
"""

BASE = """
name: from-the-config-file
description: base config
config_file: |
  backend: llama-cpp
  context_size: 512
  parameters:
    model: w.bin
    temperature: 0.2
  stopwords: ["<|end|>"]
files:
- filename: extra.txt
  uri: {url}/extra.txt
  sha256: {extra}
prompt_templates:
- name: tiny-chat-tmpl
  content: "{{{{.Input}}}}"
"""


@pytest.fixture
def gallery(files: FileServer) -> Gallery:
    sha = blob(files.root, "w.bin", 200_000)
    extra = blob(files.root, "extra.txt", 100, seed=2)
    (files.root / "index.yaml").write_text(INDEX.format(url=files.url, sha=sha))
    (files.root / "tiny.yaml").write_text(BASE.format(url=files.url, extra=extra))
    return Gallery("test", files.url + "/index.yaml")


def test_galleries_setting() -> None:
    default = parse_galleries(None)
    assert default[0].name == "localai" and default[0].mirrors == ("github:mudler/LocalAI/gallery/index.yaml@master",)
    assert parse_galleries('[{"name": "a", "url": "file:///x"}]') == [Gallery("a", "file:///x")]
    for bad, words in (("{", "not valid JSON"), ('{"name": "a"}', "JSON list"), ('[{"url": "x"}]', "name"),
                       ('[{"name": "a@b", "url": "x"}]', "without '@'"), ('[{"name": "a"}]', "url")):
        with pytest.raises(InvalidRequestError, match=words):
            parse_galleries(bad)


def test_index_entries_merge_keys_and_skip_broken_ones(gallery: Gallery) -> None:
    entries = load_index(gallery, env={})
    assert [e["name"] for e in entries] == ["tiny-chat", "Tiny-Chat-Hot"]
    assert entries[1]["files"] == entries[0]["files"] and entries[1]["overrides"]["foo"] == "bar"


def test_an_unreachable_gallery_falls_back_to_its_mirror(gallery: Gallery, files: FileServer) -> None:
    g = Gallery("test", files.url + "/gone.yaml", (files.url + "/also-gone.yaml", gallery.url))
    assert len(load_index(g, env={})) == 2
    with pytest.raises(DownloadError, match="gone.yaml.*HTTP 404.*also-gone.yaml"):
        load_index(Gallery("test", files.url + "/gone.yaml", (files.url + "/also-gone.yaml",)), env={})


def test_entry_names_match_as_localai_matches_them(gallery: Gallery) -> None:
    other = Gallery("other", "x")
    indexes = [(other, [{"name": "tiny-chat", "url": "elsewhere"}, {"name": "owner__repo__f.gguf", "url": "u"}]),
               (gallery, load_index(gallery, env={}))]
    assert find_entry(indexes, "TINY-CHAT").gallery is other  # first gallery wins
    assert find_entry(indexes, "test@tiny-chat").gallery is gallery
    assert find_entry(indexes, "test@tiny-chat-hot").entry["name"] == "Tiny-Chat-Hot"
    assert find_entry(indexes, "owner/repo/f.gguf").entry["url"] == "u"
    assert find_entry(indexes, "nope@tiny-chat") is None and find_entry(indexes, "missing") is None


# ---------------------------------------------------------------- installs and deletes

def test_install_merges_overrides_and_downloads_every_file(gallery: Gallery, tmp_path: Path) -> None:
    models = tmp_path / "models"
    entry = load_index(gallery, env={})[1]
    plan = plan_install(models, name=None, entry=entry, overrides={"parameters": {"top_k": 7}, "foo": "baz"},
                        gallery="test", env={})
    assert not models.exists()  # planning writes nothing
    path = run_install(models, plan, env={})
    cfg = yaml.safe_load(path.read_text())
    assert path.name == "Tiny-Chat-Hot.yaml" and next(iter(cfg)) == "name" and cfg["name"] == "Tiny-Chat-Hot"
    # the base config file, then the entry's overrides, then the request's (which win)
    assert cfg["parameters"] == {"model": "w.bin", "temperature": 0.9, "top_k": 7}
    assert cfg["foo"] == "baz" and cfg["context_size"] == 512 and cfg["stopwords"] == ["<|end|>"]
    assert (models / "w.bin").stat().st_size == 200_000 and (models / "extra.txt").is_file()
    assert (models / "tiny-chat-tmpl.tmpl").read_text() == "{{.Input}}"
    record = yaml.safe_load((models / "._gallery_Tiny-Chat-Hot.yaml").read_text())
    assert record == {"name": "Tiny-Chat-Hot", "gallery": "test", "files": ["extra.txt", "w.bin"],
                      "templates": ["tiny-chat-tmpl"]}
    from pylocalai.config.model_config import load_catalog

    catalog = load_catalog(models)
    assert catalog.errors == [] and catalog.names() == ["Tiny-Chat-Hot"]
    assert catalog.configs["Tiny-Chat-Hot"].parameters["temperature"] == 0.9


def test_install_from_a_config_url_with_a_name(gallery: Gallery, files: FileServer, tmp_path: Path) -> None:
    models = tmp_path / "models"
    plan = plan_install(models, name="bert", url=files.url + "/tiny.yaml", overrides={"backend": "llama"}, env={})
    cfg = yaml.safe_load(run_install(models, plan, env={}).read_text())
    assert cfg["name"] == "bert" and cfg["backend"] == "llama"
    plan = plan_install(models, name=None, url=files.url + "/tiny.yaml", overrides={}, env={})
    assert plan.name == "from-the-config-file" and plan.config["backend"] == "llama-cpp"


def test_an_inline_config_file_and_request_files(files: FileServer, tmp_path: Path) -> None:
    sha = blob(files.root, "m.gguf", 1000)
    entry = {"name": "inline", "config_file": {"parameters": {"model": "m.gguf"}, "context_size": 256}}
    plan = plan_install(tmp_path, name=None, entry=entry, env={},
                        files=[{"filename": "m.gguf", "uri": files.url + "/m.gguf", "sha256": sha}])
    run_install(tmp_path, plan, env={})
    assert (tmp_path / "m.gguf").is_file() and yaml.safe_load((tmp_path / "inline.yaml").read_text())["context_size"] == 256


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"entry": {"name": "x", "overrides": {"backend": "llama-cpp"}}}, "parameters.model"),
    ({"entry": {"name": "x", "overrides": {"parameters": {"model": "../../etc/passwd"}}}}, "inside the models folder"),
    ({"entry": {"name": "x", "overrides": {"parameters": {"model": "m.gguf"}},
                "files": [{"filename": "../m.gguf", "uri": "http://127.0.0.1:9/m"}]}}, "inside the models folder"),
    ({"entry": {"name": "x", "overrides": {"parameters": {"model": "m.gguf"}}}, "name": "../evil"}, "cannot be a file name"),
    ({"entry": {"name": "x", "overrides": {"parameters": {"model": "m.gguf"}}}, "files": [{"uri": "u"}]}, "filename"),
])
def test_bad_installs_fail_before_anything_is_written(tmp_path: Path, kwargs: dict, words: str) -> None:
    kwargs.setdefault("name", None)
    with pytest.raises(InvalidRequestError, match=words):
        plan_install(tmp_path / "models", env={}, **kwargs)
    assert not (tmp_path / "models").exists()


def test_delete_keeps_files_another_model_uses(gallery: Gallery, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for entry in load_index(gallery, env={}):
        run_install(models, plan_install(models, name=None, entry=entry, env={}), env={})
    (models / "notes.txt").write_text("not the gallery's")
    removed = delete_model(models, "Tiny-Chat-Hot")
    assert "Tiny-Chat-Hot.yaml" in removed and "w.bin" not in removed  # tiny-chat still uses w.bin
    assert (models / "w.bin").is_file() and not (models / "Tiny-Chat-Hot.yaml").exists()
    assert not (models / "._gallery_Tiny-Chat-Hot.yaml").exists()
    removed = delete_model(models, "tiny-chat")
    assert "w.bin" in removed and not (models / "w.bin").exists() and not (models / "extra.txt").exists()
    assert sorted(p.name for p in models.iterdir()) == ["notes.txt"]
    with pytest.raises(NotFoundError):
        delete_model(models, "tiny-chat")
    with pytest.raises(InvalidRequestError):
        delete_model(models, "../models")


def test_the_models_command_lists_installs_and_deletes(gallery: Gallery, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from pylocalai.cli import main

    base = ["models", "--models-path", str(tmp_path / "m"), "--galleries", f'[{{"name": "test", "url": "{gallery.url}"}}]']
    assert main([*base, "install", "test@tiny-chat-hot", "--as", "mine"]) == 0
    assert yaml.safe_load((tmp_path / "m" / "mine.yaml").read_text())["foo"] == "bar"
    assert main([*base, "list"]) == 0
    out = capsys.readouterr().out
    assert "models in" in out and ": mine" in out and " * test@tiny-chat " not in out
    assert main([*base, "install", "nope"]) == 2
    assert "no gallery has a model named 'nope'" in capsys.readouterr().err
    assert main([*base, "delete", "mine"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == []


def test_a_model_file_url_installs_with_the_gguf_template(files: FileServer, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pylocalai.cli import main
    from pylocalai.gallery.install import is_model_file_url

    assert is_model_file_url("hf://o/r/x.gguf@main") and is_model_file_url("https://h/x.GGUF?download=1")
    assert not is_model_file_url("github:o/r/gallery/index.yaml@master")
    blob(files.root, "m.gguf", 5000)
    plan = plan_install(tmp_path, name=None, url=files.url + "/m.gguf?download=true", env={})
    assert plan.name == "m.gguf" and plan.files[0].filename == "m.gguf"
    assert plan.config == {"name": "m.gguf", "backend": "llama-cpp", "parameters": {"model": "m.gguf"},
                           "template": {"use_tokenizer_template": True}, "options": ["use_jinja:true"]}
    assert main(["models", "--models-path", str(tmp_path / "m"), "--galleries", "[]", "install",
                 files.url + "/m.gguf", "--as", "small"]) == 0
    assert yaml.safe_load((tmp_path / "m" / "small.yaml").read_text())["parameters"]["model"] == "m.gguf"
    assert (tmp_path / "m" / "m.gguf").stat().st_size == 5000 and "installed small" in capsys.readouterr().out


def test_a_206_for_another_range_restarts_the_file(files: FileServer, tmp_path: Path) -> None:
    sha = blob(files.root, "w.bin", MB)
    dest = tmp_path / "w.bin"
    dest.with_name("w.bin.partial").write_bytes(b"y" * 1000)
    files.wrong_ranges = True
    assert download(files.url + "/w.bin", dest, sha, env={}) is True
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha
    assert [h.range for h in files.gets("/w.bin")] == ["bytes=1000-", None]


def test_hf_token_does_not_follow_a_redirect_to_another_host(files: FileServer, tmp_path: Path) -> None:
    cdn = FileServer(tmp_path / "cdn")
    (tmp_path / "cdn").mkdir()
    try:
        blob(cdn.root, "f.gguf", 100)
        files.redirects["/o/r/resolve/main/f.gguf"] = cdn.url + "/f.gguf"
        download("hf://o/r/f.gguf", tmp_path / "f.gguf", "", env={"HF_ENDPOINT": files.url, "HF_TOKEN": "secret"})
        assert files.hits[-1].authorization == "Bearer secret"
        assert cdn.hits[-1].authorization is None and (tmp_path / "f.gguf").stat().st_size == 100
    finally:
        cdn.close()


def test_local_files_only_on_a_local_word(gallery: Gallery, files: FileServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.env"
    secret.write_text("TOKEN=hunter2")
    local = {"filename": "stolen.gguf", "uri": secret.as_uri()}
    entry = {"name": "x", "overrides": {"parameters": {"model": "stolen.gguf"}}}
    models = tmp_path / "models"
    # an API caller, and what a remote gallery names: refused before anything is read
    for kwargs in ({"url": secret.as_uri()}, {"entry": entry, "files": [local]}, {"entry": {**entry, "files": [local]}},
                   {"entry": {**entry, "url": secret.as_uri()}}):
        with pytest.raises(InvalidRequestError, match="file:// URL is only allowed"):
            plan_install(models, name=None, env={}, **kwargs)  # type: ignore[arg-type]
    (files.root / "remote.yaml").write_text(yaml.safe_dump({"config_file": "parameters: {model: stolen.gguf}",
                                                            "files": [local]}))
    with pytest.raises(InvalidRequestError, match="file:// URL is only allowed"):
        plan_install(models, name="x", url=files.url + "/remote.yaml", env={}, trusted=True)
    # the command line or the server's settings, and a gallery that is a local folder: allowed
    plan = plan_install(models, name=None, entry=entry, files=[local], env={}, trusted=True)
    run_install(models, plan, env={})
    assert (models / "stolen.gguf").read_text() == "TOKEN=hunter2"
    assert plan_install(models, name=None, entry={**entry, "files": [local]}, env={}, entry_local=True).files
    from pylocalai.gallery.install import is_local_gallery

    assert is_local_gallery(Gallery("l", "file:///g/index.yaml")) and not is_local_gallery(gallery)
    assert not is_local_gallery(Gallery("l", "file:///g/index.yaml", (gallery.url,)))


@pytest.mark.parametrize("name", ["other.yaml", "x.YML", "chatml.tmpl", "._gallery_x.yaml", "sub/.hidden", "m.gguf.partial"])
def test_gallery_files_cannot_replace_configs_templates_or_records(tmp_path: Path, name: str) -> None:
    entry = {"name": "x", "overrides": {"parameters": {"model": "m.gguf"}}, "files": [{"filename": name, "uri": "http://h/f"}]}
    with pytest.raises(InvalidRequestError, match="cannot be a .yaml"):
        plan_install(tmp_path, name=None, entry=entry, env={})


def test_delete_keeps_templates_another_model_uses(gallery: Gallery, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for entry in load_index(gallery, env={}):
        run_install(models, plan_install(models, name=None, entry=entry, env={}), env={})
    (models / "mine.yaml").write_text(yaml.safe_dump({"name": "mine", "parameters": {"model": "./w.bin"},
                                                      "template": {"chat": "tiny-chat-tmpl"}}))
    delete_model(models, "Tiny-Chat-Hot")
    delete_model(models, "tiny-chat")  # mine still names both the template and (as ./w.bin) the weights
    assert (models / "tiny-chat-tmpl.tmpl").is_file() and (models / "w.bin").is_file()
    from pylocalai.config.model_config import load_catalog

    assert load_catalog(models).configs["mine"].template.chat == "{{.Input}}"
    delete_model(models, "mine")
    assert sorted(p.name for p in models.iterdir()) == ["tiny-chat-tmpl.tmpl"]  # not a gallery install of mine's


def test_odd_yaml_in_an_index_is_listed_as_text(files: FileServer) -> None:
    (files.root / "odd.yaml").write_text("- name: odd\n  url: http://h/x.yaml\n  released: 2024-05-01\n"
                                         "  blob: !!binary aGVsbG8=\n  tags: !!set {a, b}\n")
    entry = load_index(Gallery("odd", files.url + "/odd.yaml"), env={})[0]
    assert entry["released"] == "2024-05-01" and isinstance(entry["blob"], str) and isinstance(entry["tags"], str)


def test_stopping_the_service_ends_a_download_at_once(files: FileServer, tmp_path: Path) -> None:
    import time

    import trio

    from pylocalai.gallery.service import GalleryService

    sha = blob(files.root, "big.bin", 8 * MB)
    files.slow["/big.bin"] = 0.05  # about 1.3 MiB/s: 6 s for the file
    (files.root / "big.yaml").write_text(yaml.safe_dump({"config_file": "parameters: {model: big.bin}",
                                                         "files": [{"filename": "big.bin", "uri": files.url + "/big.bin",
                                                                    "sha256": sha}]}))
    svc = GalleryService(tmp_path / "models", [], env={})

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            job = svc.start_apply(nursery, {"url": files.url + "/big.yaml", "name": "big"})
            while job.downloaded_size in ("", "0 B"):
                await trio.sleep(0.02)
            t0 = time.monotonic()
            svc.stop()
            nursery.cancel_scope.cancel()
        return time.monotonic() - t0

    assert trio.run(main) < 2.5  # the whole file takes 6 s
    partial = tmp_path / "models" / "big.bin.partial"
    assert 0 < partial.stat().st_size < 8 * MB and not (tmp_path / "models" / "big.yaml").exists()


def test_an_entry_variant_picks_the_build_it_names() -> None:
    from pylocalai.gallery.install import pick_entry

    g = Gallery("g", "x")
    indexes = [(g, [{"name": "chat", "url": "a", "variants": [{"model": "chat-big"}, {"model": "chat-gone"}]},
                    {"name": "chat-big", "url": "b"}])]
    assert pick_entry(indexes, "chat").entry["url"] == "a"
    assert pick_entry(indexes, "g@chat", "chat-big").entry["url"] == "b"
    with pytest.raises(InvalidRequestError, match="no variant 'huge' .*chat-big, chat-gone"):
        pick_entry(indexes, "chat", "huge")
    with pytest.raises(NotFoundError, match="variant 'chat-gone' is not in gallery 'g'"):
        pick_entry(indexes, "chat", "chat-gone")
    with pytest.raises(NotFoundError, match="no gallery has a model named 'nope'"):
        pick_entry(indexes, "nope")
