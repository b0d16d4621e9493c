"""The gallery API over real HTTP (LocalAI's /models/apply, /models/jobs, /models/available,
/models/delete, /models/galleries), with galleries served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.test_server_openai import Server
from tests.fileserver import FileServer

pytestmark = pytest.mark.e2e


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[FileServer]:
    root = tmp_path_factory.mktemp("gallery")
    shutil.copy(tiny_llama, root / "tiny.gguf")
    (root / "big.bin").write_bytes(bytes(range(256)) * (12 * 4096))  # 12 MiB, sent slowly when asked
    (root / "readme.txt").write_text("extra file")
    (root / "base.yaml").write_text(yaml.safe_dump({
        "name": "base", "description": "a tiny llama",
        "config_file": yaml.safe_dump({"backend": "llama-cpp", "context_size": 256,
                                       "parameters": {"model": "tiny.gguf", "temperature": 0.0}}),
    }))
    s = FileServer(root)
    entry = {"url": f"{s.url}/base.yaml", "description": "tiny", "license": "mit", "tags": ["llm"],
             "files": [{"filename": "tiny.gguf", "uri": f"{s.url}/tiny.gguf", "sha256": sha(root / "tiny.gguf")}]}
    (root / "index.yaml").write_text(yaml.safe_dump([
        {"name": "bert", **entry},
        {"name": "bert2", **entry, "overrides": {"foo": "bar", "parameters": {"top_k": 5}},
         "files": [*entry["files"], {"filename": "readme.txt", "uri": f"{s.url}/readme.txt", "sha256": sha(root / "readme.txt")}]},
        {"name": "corrupt", **entry, "files": [{"filename": "c.gguf", "uri": f"{s.url}/tiny.gguf", "sha256": "0" * 64}]},
        {"name": "big", **entry, "overrides": {"parameters": {"model": "big.bin"}},
         "files": [{"filename": "big.bin", "uri": f"{s.url}/big.bin", "sha256": sha(root / "big.bin")}]},
    ]))
    yield s
    s.close()


def galleries(files: FileServer) -> str:
    return json.dumps([{"name": "test", "url": f"{files.url}/index.yaml"}])


@pytest.fixture(scope="module")
def server(files: FileServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("models"), env={"LOCALAI_GALLERIES": galleries(files)})
    yield s
    s.stop()


def models_dir(server: Server) -> Path:
    cmd = server.proc.args
    return Path(cmd[cmd.index("--models-path") + 1])


def apply(server: Server, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    r = httpx.post(server.url + "/models/apply", json=body, timeout=30, **kw)
    assert r.status_code == 200, r.text
    ref = r.json()
    assert ref["status"] == f"{server.url}/models/jobs/{ref['uuid']}"
    return dict(ref)


def wait_job(server: Server, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/models/jobs/{job_id}", timeout=10).json()
        if status["processed"]:
            return dict(status)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def available(server: Server) -> dict[str, bool]:
    r = httpx.get(server.url + "/models/available", timeout=30)
    assert r.status_code == 200
    return {e["name"]: e["installed"] for e in r.json()}


def listed(server: Server) -> list[str]:
    return [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]]


def test_install_from_a_gallery_as_localai_does(server: Server) -> None:
    assert available(server) == {"bert": False, "bert2": False, "corrupt": False, "big": False}
    entry = next(e for e in httpx.get(server.url + "/models/available").json() if e["name"] == "bert2")
    assert entry["gallery"]["name"] == "test" and entry["license"] == "mit" and len(entry["files"]) == 2
    job = wait_job(server, apply(server, {"id": "test@bert2"})["uuid"])
    assert job["message"] == "completed" and job["progress"] == 100 and "error" not in job
    assert job["gallery_element_name"] == "bert2" and job["deletion"] is False
    folder = models_dir(server)
    cfg = yaml.safe_load((folder / "bert2.yaml").read_text())
    assert cfg["foo"] == "bar" and cfg["parameters"] == {"model": "tiny.gguf", "temperature": 0.0, "top_k": 5}
    assert (folder / "readme.txt").read_text() == "extra file" and (folder / "tiny.gguf").is_file()
    assert available(server) == {"bert": False, "bert2": True, "corrupt": False, "big": False}
    assert "bert2" in listed(server)  # served at once, no restart
    jobs = httpx.get(server.url + "/models/jobs").json()
    assert any(j["gallery_element_name"] == "bert2" and j["processed"] for j in jobs.values())


def test_install_from_a_config_url_with_overrides(server: Server, files: FileServer) -> None:
    job = wait_job(server, apply(server, {"url": f"{files.url}/base.yaml", "name": "bert-url",
                                          "overrides": {"backend": "llama"}})["uuid"])
    assert job["message"] == "completed", job
    assert yaml.safe_load((models_dir(server) / "bert-url.yaml").read_text())["backend"] == "llama"
    job = wait_job(server, apply(server, {"url": f"{files.url}/base.yaml", "name": "bert-url2", "overrides": {}})["uuid"])
    assert yaml.safe_load((models_dir(server) / "bert-url2.yaml").read_text())["backend"] == "llama-cpp"
    assert {"bert-url", "bert-url2"} <= set(listed(server))
    # an id that is a URL is fetched as one: here a model file, configured with its own chat template
    job = wait_job(server, apply(server, {"id": f"{files.url}/tiny.gguf", "name": "by-id"})["uuid"])
    assert job["message"] == "completed", job
    cfg = yaml.safe_load((models_dir(server) / "by-id.yaml").read_text())
    assert cfg["parameters"]["model"] == "tiny.gguf" and cfg["template"] == {"use_tokenizer_template": True}


@pytest.mark.parametrize(("body", "param"), [
    ({}, "id"),
    ({"id": 5}, "id"),
    ({"id": "test@bert", "overrides": ["a"]}, "overrides"),
    ({"id": "test@bert", "name": "../up"}, "name"),
    ({"url": "x"}, "url"),
    ({"url": "http://h/c.yaml", "files": {"a": 1}}, "files"),
    ({"url": "http://h/c.yaml", "files": [{"filename": "m.gguf"}]}, "files"),
    ({"url": "file:///etc/hostname"}, "url"),  # an API caller may not read the server's files
    ({"url": "http://h/c.yaml", "files": [{"filename": "m.gguf", "uri": "file:///etc/hostname"}]}, "url"),
])
def test_bad_apply_bodies_are_400(server: Server, body: dict[str, Any], param: str) -> None:
    r = httpx.post(server.url + "/models/apply", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_failed_jobs_say_why(server: Server) -> None:
    r = httpx.post(server.url + "/models/apply", content=b"{not json")
    assert r.status_code == 400
    job = wait_job(server, apply(server, {"id": "test@missing"})["uuid"])
    assert job["message"].startswith("error: ") and "missing" in job["error"]
    job = wait_job(server, apply(server, {"id": "corrupt"})["uuid"])
    assert "sha256 mismatch" in job["error"]
    assert not (models_dir(server) / "c.gguf").exists() and not (models_dir(server) / "corrupt.yaml").exists()
    r = httpx.get(server.url + "/models/jobs/no-such-job")
    assert r.status_code == 404 and "could not find any status for ID" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_cancel_keeps_the_partial_and_a_new_install_resumes_it(server: Server, files: FileServer) -> None:
    files.slow["/big.bin"] = 0.02  # about 3 MiB/s
    job_id = apply(server, {"id": "big"})["uuid"]
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/models/jobs/{job_id}").json()["downloaded_size"] in ("", "0 B"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = httpx.post(f"{server.url}/models/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["cancelled"] is True
    job = wait_job(server, job_id)
    assert job["message"] == "cancelled" and not (models_dir(server) / "big.yaml").exists()
    partial = models_dir(server) / "big.bin.partial"
    have = partial.stat().st_size
    assert 0 < have < 12 * (1 << 20)
    assert httpx.post(f"{server.url}/models/jobs/{job_id}/cancel").status_code == 400  # already over
    files.slow.clear()
    job = wait_job(server, apply(server, {"id": "big"})["uuid"])
    assert job["message"] == "completed", job
    assert files.gets("/big.bin")[-1].range == f"bytes={have}-"
    assert sha(models_dir(server) / "big.bin") == sha(files.root / "big.bin")


def test_delete_removes_the_model_and_its_files(server: Server) -> None:
    wait_job(server, apply(server, {"id": "bert"})["uuid"])
    folder = models_dir(server)
    assert "bert" in listed(server)
    r = httpx.post(server.url + "/models/delete/bert")
    assert r.status_code == 200
    job = wait_job(server, r.json()["uuid"])
    assert job["message"] == "completed" and job["deletion"] is True
    assert "bert" not in listed(server) and not (folder / "bert.yaml").exists()
    assert (folder / "tiny.gguf").is_file()  # bert2 and the url installs still use it
    job = wait_job(server, httpx.post(server.url + "/models/delete/bert").json()["uuid"])
    assert job["message"].startswith("error: ") and "no config" in job["error"]


def test_galleries_can_be_added_and_removed(server: Server, files: FileServer) -> None:
    assert [g["name"] for g in httpx.get(server.url + "/models/galleries").json()] == ["test"]
    r = httpx.post(server.url + "/models/galleries", json={"name": "second", "url": f"{files.url}/index.yaml"})
    assert r.status_code == 200 and [g["name"] for g in r.json()] == ["test", "second"]
    assert len(httpx.get(server.url + "/models/available").json()) == 8
    assert httpx.post(server.url + "/models/galleries", json={"name": "second", "url": "x"}).status_code == 400
    r = httpx.post(server.url + "/models/galleries", json={"name": "local", "url": "file:///srv/index.yaml"})
    assert r.status_code == 400 and "file://" in r.json()["error"]["message"]
    r = httpx.request("DELETE", server.url + "/models/galleries", json={"name": "second"})
    assert r.status_code == 200 and [g["name"] for g in r.json()] == ["test"]
    assert httpx.request("DELETE", server.url + "/models/galleries", json={"name": "second"}).status_code == 404


def test_an_installed_model_serves_and_a_reinstall_reloads_it(engine: Any, server: Server) -> None:
    wait_job(server, apply(server, {"id": "bert", "name": "served"})["uuid"])
    body = {"model": "served", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    assert server.ready()["loaded"]["served"]["n_ctx_seq"] == 256
    # the same name again with another context: the loaded model's config changed, so it is unloaded
    wait_job(server, apply(server, {"id": "bert", "name": "served", "overrides": {"context_size": 512}})["uuid"])
    assert "served" not in server.ready()["loaded"]
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and server.ready()["loaded"]["served"]["n_ctx_seq"] == 512


def test_preloaded_models_and_keys(files: FileServer, tmp_path: Path) -> None:
    models = tmp_path / "models"
    preload = json.dumps([{"id": "test@bert2", "name": "preloaded"}, {"id": "nowhere"}])
    files.hold["/readme.txt"] = 3.0
    s = Server(models, "--api-keys", "k1", env={"LOCALAI_GALLERIES": galleries(files), "PRELOAD_MODELS": preload})
    try:
        auth = {"Authorization": "Bearer k1"}
        r = httpx.get(s.url + "/readyz")  # not ready while the models it was asked for are installing
        assert r.status_code == 503 and r.json()["status"] == "starting", r.text
        assert r.json()["reason"] in ("installing models: preloaded, nowhere", "installing models: preloaded")
        assert httpx.post(s.url + "/models/apply", json={"id": "bert"}).status_code == 401
        assert httpx.get(s.url + "/models/available").status_code == 401
        deadline = time.monotonic() + 30
        while "preloaded" not in [m["id"] for m in httpx.get(s.url + "/v1/models", headers=auth).json()["data"]]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        jobs = httpx.get(s.url + "/models/jobs", headers=auth).json()
        assert sorted(j["message"].split(":")[0] for j in jobs.values()) == ["completed", "error"]
        assert httpx.get(s.url + "/readyz").json()["status"] == "ready"
    finally:
        files.hold.clear()
        s.stop()


def test_models_named_at_start_are_installed_when_missing(engine: Any, files: FileServer, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    mine = {"name": "bert", "description": "edited by hand", "parameters": {"model": "tiny.gguf"}}
    (models / "bert.yaml").write_text(yaml.safe_dump(mine))
    s = Server(models, f"{files.url}/tiny.gguf", "test@bert", env={"LOCALAI_GALLERIES": galleries(files)})
    try:
        deadline = time.monotonic() + 30
        while not all(j["processed"] for j in httpx.get(s.url + "/models/jobs").json().values()) \
                or len(httpx.get(s.url + "/models/jobs").json()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert [j["message"] for j in httpx.get(s.url + "/models/jobs").json().values()] == ["completed"] * 2
        assert yaml.safe_load((models / "bert.yaml").read_text()) == mine  # already there: left alone
        cfg = yaml.safe_load((models / "tiny.gguf.yaml").read_text())  # a model file by URL: LocalAI's auto-import
        assert cfg["parameters"]["model"] == "tiny.gguf" and cfg["template"] == {"use_tokenizer_template": True}
        assert cfg["options"] == ["use_jinja:true"] and sha(models / "tiny.gguf") == sha(files.root / "tiny.gguf")
        assert listed(s) == ["bert", "tiny.gguf"]
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny.gguf", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    finally:
        s.stop()
