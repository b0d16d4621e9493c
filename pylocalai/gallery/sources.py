"""Where gallery files come from: LocalAI's URL schemes, and downloads that resume and check sha256.

Schemes, as LocalAI reads them:
- `http://`, `https://`, `file://` as they are;
- `github:owner/repo/path[@branch]` and `github://...`: the file in that repository (branch `main`
  by default), as served raw;
- `huggingface://owner/repo/path[@branch]`, `hf://...`, `hf.co/...`:
  `$HF_ENDPOINT/owner/repo/resolve/<branch>/path` (endpoint `https://huggingface.co` by default,
  `HF_MIRROR` where `HF_ENDPOINT` is unset), with `HF_TOKEN` as a bearer token there.
`oci://` and `ollama://` (container-registry pulls) are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pylocalai.errors import InvalidRequestError, PylocalaiError

log = logging.getLogger(__name__)

GITHUB_RAW = "https://raw.githubusercontent.com"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
USER_AGENT = "pylocalai-gallery"


class DownloadError(PylocalaiError):
    """A gallery file or index could not be fetched, or did not match its sha256."""


class DownloadCancelled(PylocalaiError):
    """The job was cancelled; what was downloaded stays as `<file>.partial` for the next try."""


def _split_branch(rest: str, default: str) -> tuple[str, str]:
    """`owner/repo/path@branch` -> (`owner/repo/path`, branch); an `@` inside a path component that
    is followed by a `/` belongs to the path."""
    path, at, branch = rest.rpartition("@")
    if not at or "/" in branch or not branch:
        return rest, default
    return path, branch


def _repo_path(uri: str, rest: str) -> tuple[str, str, str]:
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise InvalidRequestError(f"{uri!r}: expected owner/repo/path", param="url")
    return parts[0], parts[1], parts[2]


def is_url(text: str) -> bool:
    """A URL of one of the schemes below, rather than a gallery model's name."""
    return "://" in text or text.startswith(("github:", "hf.co/"))


def hf_endpoint(env: Mapping[str, str]) -> str:
    return (env.get("HF_ENDPOINT") or env.get("HF_MIRROR") or HF_DEFAULT_ENDPOINT).rstrip("/")


def resolve_url(uri: str, env: Mapping[str, str] | None = None, *, allow_file: bool = True) -> str:
    """The http(s) or file URL a gallery URI names. allow_file=False refuses file:// (a local file
    named by a remote gallery or an API caller: see install.plan_install)."""
    env = os.environ if env is None else env
    uri = uri.strip()
    if not allow_file and uri.lower().startswith("file:"):
        raise InvalidRequestError(f"{uri!r}: a file:// URL is only allowed from a gallery the server's admin "
                                  "configured as a local folder, or from the command line", param="url")
    for prefix in ("github://", "github:"):
        if uri.startswith(prefix):
            rest, branch = _split_branch(uri[len(prefix):], "main")
            owner, repo, path = _repo_path(uri, rest)
            return f"{GITHUB_RAW}/{owner}/{repo}/{branch}/{path}"
    for prefix in ("huggingface://", "hf://", "hf.co/", "https://hf.co/"):
        if uri.startswith(prefix):
            rest, branch = _split_branch(uri[len(prefix):], "main")
            owner, repo, path = _repo_path(uri, rest)
            return f"{hf_endpoint(env)}/{owner}/{repo}/resolve/{branch}/{path}"
    if uri.startswith(("oci://", "ollama://")):
        raise InvalidRequestError(f"{uri!r}: {uri.split(':', 1)[0]}:// sources (container-registry pulls) are not "
                                  "supported; use an http(s), github:, huggingface:// or file:// URL", param="url")
    if uri.startswith(("http://", "https://", "file://")):
        return uri
    raise InvalidRequestError(f"{uri!r} is not a URL this server can fetch (http(s)://, file://, github:, "
                              "huggingface://, hf://)", param="url")


class _RedirectKeepingTokensHome(urllib.request.HTTPRedirectHandler):
    """A redirect to another host (a CDN, or wherever a mirror points) does not carry HF_TOKEN."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_RedirectKeepingTokensHome)


def _open(url: str, env: Mapping[str, str], timeout: float, start: int = 0) -> tuple[Any, int]:
    """(response, status): status 206 when a range from `start` was served."""
    headers = {"User-Agent": USER_AGENT}
    token = env.get("HF_TOKEN")
    if token and url.startswith(hf_endpoint(env) + "/"):
        headers["Authorization"] = f"Bearer {token}"
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    resp = _OPENER.open(req, timeout=timeout)  # only the schemes resolve_url allows
    return resp, getattr(resp, "status", 200) or 200


def fetch_text(uri: str, env: Mapping[str, str] | None = None, *, timeout: float = 60,
               max_bytes: int = 64 << 20, allow_file: bool = True) -> str:
    """A small text file (an index, a config) in full."""
    env = os.environ if env is None else env
    url = resolve_url(uri, env, allow_file=allow_file)
    try:
        resp, _ = _open(url, env, timeout)
        with resp:
            data = resp.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DownloadError(f"cannot fetch {uri}: {_reason(exc)}") from None
    if len(data) > max_bytes:
        raise DownloadError(f"{uri} is larger than {max_bytes >> 20} MiB")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise DownloadError(f"{uri} is not UTF-8 text") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)


def download(uri: str, dest: Path, sha256: str = "", *, env: Mapping[str, str] | None = None,
             progress: Progress | None = None, cancelled: Callable[[], bool] = lambda: False,
             timeout: float = 60) -> bool:
    """Download uri to dest. Returns False when dest was already there (and matched sha256).

    An existing file with a sha256 given is hashed: a match is kept, a mismatch downloaded again.
    The download goes to `<dest>.partial`, resumed with an HTTP range when that is there from an
    earlier try, hashed on the way, and renamed only when its sha256 matches (a mismatch removes
    it). An empty sha256 is accepted with a warning, as LocalAI does.
    """
    env = os.environ if env is None else env
    want = sha256.strip().lower()
    if dest.is_file():
        if not want or file_sha256(dest) == want:
            return False
        log.warning("%s does not match its sha256: downloading it again", dest.name)
        dest.unlink()
    url = resolve_url(uri, env)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    for attempt in (0, 1):
        h = hashlib.sha256()
        have = partial.stat().st_size if partial.is_file() else 0
        if have:
            with partial.open("rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        try:
            resp, status = _open(url, env, timeout, start=have)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have and attempt == 0:  # the partial is whole, or from another file
                partial.unlink()
                continue
            raise DownloadError(f"cannot download {uri}: {_reason(exc)}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DownloadError(f"cannot download {uri}: {_reason(exc)}") from None
        with resp:
            if have and status == 206 and not str(resp.headers.get("Content-Range", "")).startswith(f"bytes {have}-"):
                if attempt == 0:  # not the range asked for: start the file again
                    partial.unlink()
                    continue
                raise DownloadError(f"cannot download {uri}: the server answered a range other than the one asked for")
            if have and status != 206:  # the server sent the whole file: start over
                have, h = 0, hashlib.sha256()
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            done = have
            read = getattr(resp, "read1", resp.read)
            try:
                with partial.open("ab" if have else "wb") as out:
                    while True:
                        if cancelled():
                            raise DownloadCancelled(f"download of {dest.name} cancelled")
                        chunk = read(CHUNK)  # what has arrived, up to CHUNK: a cancel is seen soon
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
            except (urllib.error.URLError, OSError) as exc:
                raise DownloadError(f"download of {uri} broke off after {done} bytes ({_reason(exc)}); "
                                    "trying again resumes it") from None
        if total is not None and done != total:
            raise DownloadError(f"download of {uri} ended after {done} of {total} bytes; trying again resumes it")
        got = h.hexdigest()
        if want and got != want:
            partial.unlink()
            raise DownloadError(f"{dest.name}: sha256 mismatch (expected {want}, got {got}); the file was removed")
        if not want:
            log.warning("%s has no sha256 in its gallery entry: not verified", dest.name)
        os.replace(partial, dest)
        return True
    raise DownloadError(f"cannot download {uri}")  # pragma: no cover - the loop returns or raises
