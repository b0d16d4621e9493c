"""The CUDA install path: `CMAKE_ARGS="-DGGML_CUDA=on"` must configure on a machine with nvcc and
no GPU (building and running it needs a GPU machine; see README).

A full CUDA toolkit has cuBLAS and the driver stub. Where the machine's toolkit is only nvcc and
the runtime (as on this project's CI image), cuBLAS comes from NVIDIA's `nvidia-cublas` package
(scripts/bootstrap.sh --test installs it there) and the driver library is avoided with ggml's own
GGML_CUDA_NO_VMM option.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE_DIRS = {"llama_cpp": ROOT / "third_party" / "llama.cpp", "ik_llama_cpp": ROOT / "third_party" / "ik_llama.cpp"}


def _require(reason: str) -> None:
    if os.environ.get("PYLOCALAI_REQUIRE_ALL"):
        pytest.fail(f"PYLOCALAI_REQUIRE_ALL is set but {reason}")
    pytest.skip(reason)


def _toolkit_supplements(nvcc: str) -> list[str]:
    """-D flags naming the cuBLAS libraries and skipping the driver library when the toolkit lacks them."""
    toolkit = Path(nvcc).resolve().parent.parent
    libdirs = [toolkit / "lib64", toolkit / "targets" / "x86_64-linux" / "lib"]
    flags: list[str] = []
    if not any(d.glob("libcublas.so*") for d in libdirs if d.is_dir()):
        spec = importlib.util.find_spec("nvidia")
        found = [p for loc in (spec.submodule_search_locations or []) for p in Path(loc).glob("cu*/lib/libcublas.so.*")] if spec else []
        if not found:
            _require("the CUDA toolkit has no cuBLAS and the nvidia-cublas package is not installed")
        lib = found[0].parent
        flags += [f"-DCUDA_cublas_LIBRARY={next(lib.glob('libcublas.so.*'))}",
                  f"-DCUDA_cublasLt_LIBRARY={next(lib.glob('libcublasLt.so.*'))}"]
    if not any(d.glob("stubs/libcuda.so") for d in libdirs if d.is_dir()):
        flags.append("-DGGML_CUDA_NO_VMM=ON")
    return flags


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINE_DIRS))
def test_cuda_configure_succeeds_and_forwards_the_flag(tmp_path: Path, engine: str) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        _require("nvcc is not installed")
    engine_dir = ENGINE_DIRS[engine]
    if not (engine_dir / "CMakeLists.txt").is_file():
        _require("the engine sources are not fetched")
    import pybind11

    py = [f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    # the top-level project, as `CMAKE_ARGS="-DGGML_CUDA=on" pip install .` configures it ...
    top = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "top"), "-G", "Ninja", "-DGGML_CUDA=on", *py],
                         capture_output=True, text=True, timeout=600)
    assert top.returncode == 0, top.stdout[-3000:] + top.stderr[-3000:]
    assert "-DGGML_CUDA=on" in top.stdout  # forwarded to every engine sub-build
    # ... and the engine sub-build it forwards the flag to (no GPU to detect: architecture given)
    sub = subprocess.run(
        ["cmake", "-S", str(ROOT / "cpp"), "-B", str(tmp_path / "engine"), "-G", "Ninja", "-DGGML_CUDA=on",
         "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DPYLOCALAI_ENGINE={engine}", f"-DPYLOCALAI_ENGINE_DIR={engine_dir}",
         "-DPYLOCALAI_BUILD_TOOLS=OFF", *py, *_toolkit_supplements(nvcc)],
        capture_output=True, text=True, timeout=600,
    )
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    assert ("Including CUDA backend" if engine == "llama_cpp" else "CUDA found") in sub.stdout
    cache = (tmp_path / "engine" / "CMakeCache.txt").read_text()
    assert "GGML_CUDA:BOOL=on" in cache.replace("GGML_CUDA:BOOL=ON", "GGML_CUDA:BOOL=on")
    ninja = (tmp_path / "engine" / "build.ninja").read_text()
    assert "ggml-cuda/mmq.cu" in ninja  # the CUDA kernels are part of the engine build


def test_rocm_flag_is_translated_for_ik_llama_cpp(tmp_path: Path) -> None:
    """ik_llama.cpp still spells ROCm GGML_HIPBLAS: the top level hands each engine its own spelling."""
    if not all((d / "CMakeLists.txt").is_file() for d in ENGINE_DIRS.values()):
        _require("the engine sources are not fetched")
    import pybind11

    py = [f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    top = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "top"), "-G", "Ninja", "-DGGML_HIP=on",
                          "-DPYLOCALAI_ENGINES=llama_cpp;ik_llama_cpp", *py],
                         capture_output=True, text=True, timeout=600)
    assert top.returncode == 0, top.stdout[-3000:] + top.stderr[-3000:]
    args = {}
    for engine in ENGINE_DIRS:
        cfg = next((tmp_path / "top").rglob(f"engine_{engine}-cfgcmd.txt"))
        args[engine] = cfg.read_text()
    assert "-DGGML_HIP=on" in args["llama_cpp"] and "HIPBLAS" not in args["llama_cpp"]
    assert "-DGGML_HIPBLAS=on" in args["ik_llama_cpp"] and "-DGGML_HIP=on" not in args["ik_llama_cpp"]
