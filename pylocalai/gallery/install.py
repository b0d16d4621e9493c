"""Gallery indexes, and installing or deleting a model in the models folder, as LocalAI does.

An index is a YAML list of entries (YAML anchors and merge keys allowed): `name`, `url` (a gallery
config file to start from), `config_file` (an inline config when there is no url), `overrides`,
`files` (`filename`, `uri`, `sha256`), and the metadata `/models/available` lists. A gallery config
file holds `config_file` (the model config as YAML text), `files` and `prompt_templates`.

Installing writes `<models>/<name>.yaml` (the config, with the entry's then the request's overrides
merged over it) after every file is downloaded and checked, plus a `._gallery_<name>.yaml` record of
what it installed, which a delete uses.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pylocalai.config.model_config import (
    ConfigError,
    load_yaml,
    parse_config,
    safe_model_file,
)
from pylocalai.errors import InvalidRequestError, NotFoundError
from pylocalai.gallery.sources import (
    DownloadError,
    Progress,
    download,
    fetch_text,
    resolve_url,
)

log = logging.getLogger(__name__)

DEFAULT_GALLERIES_JSON = json.dumps([{
    "name": "localai", "url": "https://index.localai.io/models",
    "mirrors": ["github:mudler/LocalAI/gallery/index.yaml@master"],
}])


@dataclass(frozen=True)
class Gallery:
    name: str
    url: str
    mirrors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "mirrors": list(self.mirrors)}


def parse_gallery(doc: Any, where: str = "gallery") -> Gallery:
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"{where}: a gallery is an object with name and url")
    name, url, mirrors = doc.get("name"), doc.get("url"), doc.get("mirrors") or []
    if not isinstance(name, str) or not name.strip() or "@" in name:
        raise InvalidRequestError(f"{where}: 'name' must be a non-empty string without '@'", param="name")
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError(f"{where}: 'url' must be a non-empty string", param="url")
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise InvalidRequestError(f"{where}: 'mirrors' must be a list of URLs", param="mirrors")
    return Gallery(name.strip(), url.strip(), tuple(mirrors))


def parse_galleries(text: str | None) -> list[Gallery]:
    """LOCALAI_GALLERIES: a JSON list of {name, url, mirrors}; unset means LocalAI's own gallery."""
    try:
        docs = json.loads(text if text is not None and text.strip() else DEFAULT_GALLERIES_JSON)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"galleries: not valid JSON: {exc}") from None
    if not isinstance(docs, list):
        raise InvalidRequestError("galleries: expected a JSON list of {name, url, mirrors}")
    return [parse_gallery(d, f"galleries[{i}]") for i, d in enumerate(docs)]


def load_index(gallery: Gallery, env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The gallery's entries, from its url or else its mirrors in turn. Malformed entries are logged and left out."""
    errors: list[str] = []
    for url in (gallery.url, *gallery.mirrors):
        try:
            docs = load_yaml(fetch_text(url, env))
        except (DownloadError, InvalidRequestError) as exc:
            errors.append(exc.message)
            continue
        except yaml.YAMLError as exc:
            errors.append(f"{url}: not valid YAML: {exc}")
            continue
        if not isinstance(docs, list):
            errors.append(f"{url}: a gallery index is a YAML list of entries")
            continue
        entries = []
        for i, doc in enumerate(docs):
            problem = _entry_problem(doc)
            if problem:
                log.warning("gallery %s: entry %d skipped: %s", gallery.name, i, problem)
                continue
            # as JSON data: YAML's dates, sets or binary become text, so the entry can be listed
            entries.append(json.loads(json.dumps(doc, default=str)))
        return entries
    raise DownloadError(f"gallery {gallery.name!r}: " + "; ".join(errors))


def _entry_problem(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "not a mapping"
    if not isinstance(doc.get("name"), str) or not doc["name"].strip():
        return "no name"
    if not any(doc.get(k) for k in ("url", "config_file", "overrides", "files")):
        return "no url, config_file, overrides or files"
    return ""


@dataclass
class Found:
    gallery: Gallery
    entry: dict[str, Any]


def find_entry(indexes: list[tuple[Gallery, list[dict[str, Any]]]], requested: str) -> Found | None:
    """LocalAI's matching: case-insensitive; `gallery@name` looks in that gallery only; a `/` in the
    name stands for `__`."""
    gallery_name, at, name = requested.partition("@")
    if not at:
        gallery_name, name = "", requested
    name = name.replace("/", "__").lower()
    for gallery, entries in indexes:
        if gallery_name and gallery.name.lower() != gallery_name.lower():
            continue
        for entry in entries:
            if str(entry["name"]).lower() == name:
                return Found(gallery, entry)
    return None


def pick_entry(indexes: list[tuple[Gallery, list[dict[str, Any]]]], requested: str,
               variant: str | None = None) -> Found:
    """The entry an apply names, or the variant of it that the entry lists under `variants`."""
    found = find_entry(indexes, requested)
    if found is None:
        raise NotFoundError(f"no gallery has a model named {requested!r}", param="id")
    if not variant:
        return found
    listed = [v.get("model") for v in found.entry.get("variants") or [] if isinstance(v, dict)]
    if variant not in listed:
        raise InvalidRequestError(f"{found.entry['name']!r} has no variant {variant!r} "
                                  f"(it has: {', '.join(map(str, listed)) or 'none'})", param="variant")
    other = find_entry(indexes, f"{found.gallery.name}@{variant}")
    if other is None:
        raise NotFoundError(f"variant {variant!r} is not in gallery {found.gallery.name!r}", param="variant")
    return other


def entry_summary(gallery: Gallery, entry: dict[str, Any], installed: bool) -> dict[str, Any]:
    """One element of GET /models/available."""
    overrides = entry.get("overrides") if isinstance(entry.get("overrides"), dict) else {}
    return {
        "url": entry.get("url", ""), "name": entry["name"], "description": entry.get("description", ""),
        "license": entry.get("license", ""), "urls": entry.get("urls") or [], "icon": entry.get("icon", ""),
        "tags": entry.get("tags") or [], "files": entry.get("files") or [], "size": entry.get("size", ""),
        "gallery": gallery.to_json(), "installed": installed,
        "backend": entry.get("backend") or overrides.get("backend", ""),
    }


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """over merged into a copy of base: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def safe_name(name: Any, what: str = "name") -> str:
    """A model or template name that becomes a file name in the models folder."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(f"{what} must be a non-empty string", param=what)
    name = name.strip()
    if "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise InvalidRequestError(f"{what} {name!r} cannot be a file name in the models folder "
                                  "(no '/', no leading '.')", param=what)
    return name


@dataclass(frozen=True)
class GalleryFile:
    filename: str
    uri: str
    sha256: str = ""


_RESERVED_SUFFIXES = (".yaml", ".yml", ".tmpl", ".partial")


def parse_files(items: Any, where: str, *, local_ok: bool = False) -> list[GalleryFile]:
    """A gallery's `files` list. A file may not be a config, template or partial download (it would
    replace another model's), nor a dot-file (the delete records), nor a local file unless local_ok."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidRequestError(f"{where}: 'files' must be a list of {{filename, uri, sha256}}", param="files")
    out = []
    for i, f in enumerate(items):
        if not isinstance(f, dict) or not isinstance(f.get("filename"), str) or not isinstance(f.get("uri"), str):
            raise InvalidRequestError(f"{where}: files[{i}] needs a filename and a uri", param="files")
        sha = f.get("sha256") or ""
        if not isinstance(sha, str):
            raise InvalidRequestError(f"{where}: files[{i}].sha256 must be a string", param="files")
        fname = f["filename"]
        safe_model_file(Path("models"), fname, f"{where}: files[{i}]")
        if fname.lower().endswith(_RESERVED_SUFFIXES) or any(p.startswith(".") for p in Path(fname).parts):
            raise InvalidRequestError(f"{where}: files[{i}] {fname!r}: a gallery file cannot be a .yaml, .yml, "
                                      ".tmpl or .partial file, nor a dot-file", param="files")
        _check_source(f["uri"], local_ok)
        out.append(GalleryFile(fname, f["uri"], sha))
    return out


@dataclass
class InstallPlan:
    """Everything an install will write, worked out (and the base config fetched) before any download."""

    name: str
    config: dict[str, Any]
    files: list[GalleryFile]
    templates: dict[str, str] = field(default_factory=dict)
    gallery: str = ""


def plan_install(models_dir: Path, *, name: str | None, entry: dict[str, Any] | None = None, url: str = "",
                 overrides: Mapping[str, Any] | None = None, files: Any = None, gallery: str = "",
                 env: Mapping[str, str] | None = None, trusted: bool = False, entry_local: bool = False) -> InstallPlan:
    """The config and files for an install of a gallery entry, of a gallery config file at url, or
    of a model file at url (a `.gguf`: see model_file_config).

    Local files (file:// URLs) are read only on the word of someone who could read them anyway:
    the request's own url and files when `trusted` (the command line, the server's settings; not an
    API caller), the entry's when its gallery is a local folder (`entry_local`), and a gallery
    config file's own files when it is itself local."""
    entry = entry or {}
    base_url = url or entry.get("url") or ""
    _check_source(url, trusted)
    _check_source(entry.get("url") or "", entry_local)
    config: dict[str, Any] = {}
    base_files: list[GalleryFile] = []
    base_local = base_url.lower().startswith("file:")
    templates: dict[str, str] = {}
    if url and is_model_file_url(url):
        filename = model_file_name(url)
        config = model_file_config(filename)
        base_files = [GalleryFile(filename, url)]
        name = name or filename
    elif base_url:
        try:
            doc = load_yaml(fetch_text(base_url, env))
        except yaml.YAMLError as exc:
            raise DownloadError(f"{base_url}: not valid YAML: {exc}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise DownloadError(f"{base_url}: a gallery config file is a YAML mapping")
        config = _config_map(doc.get("config_file"), base_url)
        base_files = parse_files(doc.get("files"), base_url, local_ok=base_local)
        for i, t in enumerate(doc.get("prompt_templates") or []):
            if not isinstance(t, dict) or not isinstance(t.get("content"), str):
                raise DownloadError(f"{base_url}: prompt_templates[{i}] needs a name and a content")
            templates[safe_name(t.get("name"), "prompt_templates.name")] = t["content"]
        if not name and not entry.get("name") and isinstance(doc.get("name"), str):
            name = doc["name"]
    elif entry.get("config_file") is not None:
        config = _config_map(entry["config_file"], f"entry {entry.get('name')!r}")
    install_name = safe_name(name or entry.get("name"), "name")
    config["name"] = install_name
    if isinstance(entry.get("overrides"), dict):
        config = deep_merge(config, entry["overrides"])
    if overrides:
        if not isinstance(overrides, Mapping):
            raise InvalidRequestError("'overrides' must be an object", param="overrides")
        config = deep_merge(config, overrides)
    config.pop("name", None)  # overrides do not rename what is being installed
    config = {"name": install_name, **config}
    all_files = [*base_files, *parse_files(entry.get("files"), f"entry {install_name!r}", local_ok=entry_local),
                 *parse_files(files, "request", local_ok=trusted)]
    try:  # the config must load before anything is written
        parse_config(config, models_dir, f"{install_name}.yaml")
    except ConfigError as exc:
        raise InvalidRequestError(f"the installed config would not load: {exc.message}", param=exc.param) from None
    return InstallPlan(install_name, config, all_files, templates, gallery)


def _check_source(uri: str, local_ok: bool) -> None:
    if uri:
        resolve_url(uri, {}, allow_file=local_ok)


def is_local_gallery(gallery: Gallery) -> bool:
    """A gallery read from local files only: what its entries name may be local files too."""
    return all(u.lower().startswith("file:") for u in (gallery.url, *gallery.mirrors))


def is_model_file_url(uri: str) -> bool:
    return _url_path(uri).lower().endswith(".gguf")


def _url_path(uri: str) -> str:
    """The file part of a URI, without a query or a trailing @branch."""
    path = uri.split("?", 1)[0].split("#", 1)[0]
    last = path.rsplit("/", 1)[-1]
    if "@" in last and not last.lower().endswith(".gguf"):
        path = path[: path.rindex("@")]
    return path


def model_file_name(uri: str) -> str:
    return safe_name(_url_path(uri).rsplit("/", 1)[-1], "url")


def model_file_config(filename: str) -> dict[str, Any]:
    """LocalAI's auto-import of a bare model file: llama.cpp with the GGUF's own chat template."""
    return {"backend": "llama-cpp", "parameters": {"model": filename},
            "template": {"use_tokenizer_template": True}, "options": ["use_jinja:true"]}


def _config_map(value: Any, where: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = load_yaml(value)
        except yaml.YAMLError as exc:
            raise DownloadError(f"{where}: config_file is not valid YAML: {exc}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DownloadError(f"{where}: config_file must be a mapping")
    return dict(value)


FileProgress = Callable[[GalleryFile, int, int, int | None], None]  # (file, index, done, total)


def run_install(models_dir: Path, plan: InstallPlan, *, env: Mapping[str, str] | None = None,
                progress: FileProgress | None = None, cancelled: Callable[[], bool] = lambda: False) -> Path:
    """Download the plan's files, then write its templates, config and record. Returns the config path."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(plan.files):
        dest = safe_model_file(models_dir, f.filename, f"file {f.filename!r}")
        on: Progress | None = None
        if progress is not None:
            def on(done: int, total: int | None, f: GalleryFile = f, i: int = i) -> None:
                progress(f, i, done, total)
        download(f.uri, dest, f.sha256, env=env, progress=on, cancelled=cancelled)
    for tname, content in plan.templates.items():
        _write_atomic(models_dir / f"{tname}.tmpl", content)
    path = models_dir / f"{plan.name}.yaml"
    _write_atomic(path, yaml.safe_dump(plan.config, sort_keys=False, allow_unicode=True))
    record = {"name": plan.name, "gallery": plan.gallery, "files": [f.filename for f in plan.files],
              "templates": sorted(plan.templates)}
    _write_atomic(models_dir / f"._gallery_{plan.name}.yaml", yaml.safe_dump(record, sort_keys=False))
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # a dot-file: the catalog skips it
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def installed(models_dir: Path, name: str) -> bool:
    return (models_dir / f"{name}.yaml").is_file() or (models_dir / f"{name}.yml").is_file()


def delete_model(models_dir: Path, name: str) -> list[str]:
    """Remove a model: its config, the files its gallery record lists and the files its config names,
    unless another config in the folder uses them; a loose .gguf goes too. Returns the removed names."""
    name = safe_name(name)
    config_path = next((p for p in (models_dir / f"{name}.yaml", models_dir / f"{name}.yml") if p.is_file()), None)
    record_path = models_dir / f"._gallery_{name}.yaml"
    loose = models_dir / name
    if config_path is None and not (name.endswith(".gguf") and loose.is_file()):
        raise NotFoundError(f"model {name!r} has no config in the models folder", param="name")
    candidates: set[str] = set()
    templates: list[str] = []
    if config_path is not None:
        doc = _read_yaml(config_path)
        if isinstance(doc, dict):
            params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
            candidates.update(str(v) for v in (params.get("model"), doc.get("mmproj")) if isinstance(v, str))
    else:
        candidates.add(name)
    record = _read_yaml(record_path) if record_path.is_file() else None
    if isinstance(record, dict):
        candidates.update(str(f) for f in record.get("files") or [])
        templates = [str(t) for t in record.get("templates") or []]
    in_use, templates_in_use = _used_by_others(models_dir, config_path, record_path)
    removed = []
    for fname in sorted(candidates):
        try:
            path = safe_model_file(models_dir, fname, f"file {fname!r}")
        except ConfigError:
            continue
        if os.path.normpath(fname) in in_use or not path.is_file():
            continue
        path.unlink()
        removed.append(fname)
    for tname in templates:
        if tname not in templates_in_use and "/" not in tname and not tname.startswith("."):
            (models_dir / f"{tname}.tmpl").unlink(missing_ok=True)
    for p in (config_path, record_path):
        if p is not None and p.is_file():
            p.unlink()
            removed.append(p.name)
    return removed


def _read_yaml(path: Path) -> Any:
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _used_by_others(models_dir: Path, skip: Path | None, skip_record: Path) -> tuple[set[str], set[str]]:
    """The files (normalized paths) and templates (`<name>.tmpl` names) that the other configs in
    the folder name, or that the other gallery records installed."""
    files: set[str] = set()
    templates: set[str] = set()
    for path in models_dir.iterdir():
        if path.suffix.lower() not in (".yaml", ".yml") or path in (skip, skip_record):
            continue
        if path.name.startswith("._gallery_"):
            record = _read_yaml(path)
            if isinstance(record, dict):
                templates.update(str(t) for t in record.get("templates") or [])
            continue
        if path.name.startswith("."):
            continue
        docs = _read_yaml(path)
        for doc in docs if isinstance(docs, list) else [docs]:
            if not isinstance(doc, dict):
                continue
            params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
            files.update(os.path.normpath(str(v)) for v in (params.get("model"), doc.get("mmproj")) if isinstance(v, str))
            tmpl = doc.get("template") if isinstance(doc.get("template"), dict) else {}
            templates.update(v.strip() for v in tmpl.values() if isinstance(v, str) and "{{" not in v and "\n" not in v)
    return files, templates
