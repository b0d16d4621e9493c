#!/usr/bin/env python3
"""Fill the engine submodules under third_party/.

Each engine is a git submodule pinned to one upstream commit. The normal way to get it is
`git submodule update --init`. Where the upstream git host cannot be reached, the same engine
source is taken from a pinned Python sdist that vendors it (by package name and version), after
checking the archive's sha256 against the value recorded here.

Idempotent: an engine whose tree is already present is left alone. Exits non-zero with a clear
message when neither way works.

Usage: python scripts/fetch_engines.py [ENGINE ...]   (default: every engine)
Environment: PYLOCALAI_FETCH=git|sdist|auto (default auto), PYLOCALAI_SDIST_CACHE (download cache).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class EngineSource:
    path: str  # submodule path, relative to the repo root
    commit: str  # the gitlink the superproject pins
    sdist_name: str  # package that vendors the same tree
    sdist_version: str
    sdist_sha256: str
    sdist_subdir: str  # where the engine tree lives inside the sdist


ENGINES: dict[str, EngineSource] = {
    "llama_cpp": EngineSource(
        path="third_party/llama.cpp",
        commit="0c1e57098bba43ac29e6e3b677cdceebdd22334f",
        sdist_name="llama-cpp-python",
        sdist_version="0.3.36",
        sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        sdist_subdir="vendor/llama.cpp",
    ),
    "ik_llama_cpp": EngineSource(
        path="third_party/ik_llama.cpp",
        commit="",  # read from the index at run time; see _pinned_commit
        sdist_name="ik-llama-cpp-python",
        sdist_version="0.1.5",
        sdist_sha256="33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad",
        sdist_subdir="vendor/ik_llama.cpp",
    ),
}

MARKER = ".pylocalai-source"


class FetchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[fetch-engines] {msg}", file=sys.stderr, flush=True)


def is_present(src: EngineSource) -> bool:
    return (ROOT / src.path / "CMakeLists.txt").is_file()


def _pinned_commit(src: EngineSource) -> str:
    """The gitlink recorded in the superproject's index, or the fallback pin above."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-s", "--", src.path],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return src.commit
    return out[1] if len(out) >= 2 and out[0] == "160000" else src.commit


def try_git(src: EngineSource) -> bool:
    if not (ROOT / ".git").exists():
        return False
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    cmd = ["git", "-c", "http.lowSpeedLimit=1000", "-c", "http.lowSpeedTime=30",
           "submodule", "update", "--init", "--depth", "1", "--", src.path]
    log(f"trying: {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"git submodule update failed: {exc}")
        _clean_partial(src)
        return False
    if proc.returncode != 0 or not is_present(src):
        log("git submodule update failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
        _clean_partial(src)
        return False
    return True


def _clean_partial(src: EngineSource) -> None:
    """A failed clone may leave an empty directory or a half-made module repo behind."""
    target = ROOT / src.path
    if target.exists() and not is_present(src):
        shutil.rmtree(target, ignore_errors=True)
    modules = ROOT / ".git" / "modules" / src.path
    if modules.exists() and not is_present(src):
        shutil.rmtree(modules, ignore_errors=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_sdist(src: EngineSource, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{src.sdist_name.replace('-', '_')}-{src.sdist_version}"
    for candidate in (cache / f"{stem}.tar.gz", cache / f"{src.sdist_name}-{src.sdist_version}.tar.gz"):
        if candidate.is_file() and sha256_of(candidate) == src.sdist_sha256:
            return candidate
    # --no-build-isolation: pip still prepares the sdist's metadata, and with isolation it would
    # build the sdist's build requirements from source too. The backend (scikit-build-core)
    # is one of ours, so it is installed already.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", src.sdist_name,
           "--no-build-isolation", "-d", str(cache), f"{src.sdist_name}=={src.sdist_version}"]
    log(f"downloading {src.sdist_name}=={src.sdist_version}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise FetchError(f"pip download of {src.sdist_name}=={src.sdist_version} failed:\n{proc.stderr[-2000:]}")
    found = sorted(cache.glob(f"{stem}.tar.gz")) + sorted(cache.glob(f"{src.sdist_name}-{src.sdist_version}.tar.gz"))
    if not found:
        raise FetchError(f"pip download of {src.sdist_name} produced no sdist in {cache}")
    digest = sha256_of(found[0])
    if digest != src.sdist_sha256:
        found[0].unlink()
        raise FetchError(
            f"{found[0].name}: sha256 {digest} does not match the pinned {src.sdist_sha256}; refusing to use it"
        )
    return found[0]


def extract_subdir(archive: Path, subdir: str, dest: Path) -> None:
    """Extract archive's <top>/<subdir>/ as dest, atomically (a half-extracted tree never stays)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        top = members[0].name.split("/", 1)[0]
        prefix = f"{top}/{subdir.strip('/')}/"
        chosen = []
        for m in members:
            rel = m.name[len(prefix):]
            # the sdist's own `.git` file points into its build tree; the submodule must not have one
            if m.name.startswith(prefix) and rel and rel.split("/", 1)[0] != ".git" and not (m.issym() or m.islnk()):
                m.name = rel
                chosen.append(m)
        if not chosen:
            raise FetchError(f"{archive.name} has no {subdir}/")
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
        try:
            tar.extractall(tmp, members=chosen, filter="data")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.replace(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def try_sdist(name: str, src: EngineSource) -> None:
    cache = Path(os.environ.get("PYLOCALAI_SDIST_CACHE", Path.home() / ".cache" / "pylocalai" / "sdists"))
    archive = download_sdist(src, cache)
    dest = ROOT / src.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    extract_subdir(archive, src.sdist_subdir, dest)
    (dest / MARKER).write_text(
        f"engine={name}\nsdist={src.sdist_name}=={src.sdist_version}\nsha256={src.sdist_sha256}\n"
        f"pinned_commit={_pinned_commit(src)}\n"
    )
    if not is_present(src):
        raise FetchError(f"{src.path}: extracted tree has no CMakeLists.txt")
    log(f"{src.path}: filled from {archive.name} (sha256 checked)")


def fetch(name: str) -> None:
    src = ENGINES[name]
    if is_present(src):
        log(f"{src.path}: present")
        return
    mode = os.environ.get("PYLOCALAI_FETCH", "auto")
    if mode not in ("auto", "git", "sdist"):
        raise FetchError(f"PYLOCALAI_FETCH must be auto, git or sdist, not {mode!r}")
    if mode in ("auto", "git") and try_git(src):
        log(f"{src.path}: checked out at {_pinned_commit(src)}")
        return
    if mode == "git":
        raise FetchError(f"{src.path}: git submodule update failed and PYLOCALAI_FETCH=git forbids the sdist fallback")
    try:
        try_sdist(name, src)
    except (FetchError, OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
        raise FetchError(
            f"{src.path}: neither `git submodule update --init` nor the pinned sdist "
            f"{src.sdist_name}=={src.sdist_version} worked: {exc}"
        ) from exc


def main(argv: list[str]) -> int:
    names = argv or list(ENGINES)
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        log(f"unknown engine(s) {unknown}; known: {list(ENGINES)}")
        return 2
    try:
        for name in names:
            fetch(name)
    except FetchError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
