#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command, offline: the `gpu`-marked tests, then every benchmark
# (optimizer step on each GPU kernel backend, mosaic_gpu and triton, vs Optax and torch fused/foreach AdamW;
# normalization per backend vs flax and torch; the lowering report, augmentation). Writes JSON to benchmarks/results/<benchmark>_<device>.json, a log
# (gpu_run_<device>.log) and a summary of every step's exit status (gpu_run_<device>.json) beside them.
# A failing step does not stop the run; the exit status is non-zero at the end if any step failed.
#
#   benchmarks/gpu.sh
#   PYTHON=/opt/torch/.venv/bin/python3 ITERS=20 STEP_TIMEOUT=1800 OUT_DIR=/tmp/results benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-benchmarks/results}
ITERS=${ITERS:-20}
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}  # seconds per step

# tests/conftest.py pins JAX to the CPU only when JAX_PLATFORMS is unset (setdefault): name the GPU.
export JAX_PLATFORMS=cuda
# Several processes (JAX rows run in subprocesses) and torch share the GPU: no 75% preallocation each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export MPLBACKEND=Agg
export PYTHONDONTWRITEBYTECODE=1

mkdir -p "$OUT_DIR"

# optax_ext from this checkout must be importable (its kernels/ folder installs as optax_ext.kernels, so a
# plain PYTHONPATH does not do): an editable install from the local files, no index, no network.
if ! "$PYTHON" - <<'EOF' 2>/dev/null; then
import pathlib, sys
import optax_ext, optax_ext.kernels
root = pathlib.Path.cwd().resolve()
sys.exit(0 if all(root in pathlib.Path(m.__file__).resolve().parents for m in (optax_ext, optax_ext.kernels)) else 1)
EOF
    echo "installing optax_ext from $(pwd) (editable, --no-index --no-deps --no-build-isolation)"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
fi

DEVICE_KIND=$("$PYTHON" -c 'import jax; d = jax.devices()[0]; assert d.platform == "gpu", d; print(d.device_kind)') || {
    echo "gpu.sh: JAX sees no CUDA GPU (JAX_PLATFORMS=cuda); nothing run" >&2
    exit 2
}
DEVICE=$(printf '%s' "$DEVICE_KIND" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '_' | sed 's/^_*//; s/_*$//')
LOG="$OUT_DIR/gpu_run_${DEVICE}.log"
SUMMARY="$OUT_DIR/gpu_run_${DEVICE}.json"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

echo "gpu.sh on ${DEVICE_KIND} ($(date -u '+%Y-%m-%d %H:%M UTC')), results in ${OUT_DIR}, ${ITERS} iterations"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv || true
"$PYTHON" - <<'EOF' || true
import platform, jax, jaxlib, optax, flax
import optax_ext
print(f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"optax {optax.__version__}, flax {flax.__version__}, optax_ext {optax_ext.__version__}, "
      f"kernels backend {optax_ext.kernels.get_backend()}")
try:
    import torch
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
except ImportError:
    print("torch: not installed (torch rows skipped)")
EOF
if [[ -n "${OPTAX_EXT_BACKEND:-}" ]]; then
    echo "note: OPTAX_EXT_BACKEND=${OPTAX_EXT_BACKEND} overrides the kernel backend for every step"
fi

STEPS=()
CODES=()
TIMES=()
FAILED=()

step() {  # step NAME COMMAND...: run it under the time limit, record its exit status, never stop the run
    local name=$1
    shift
    echo
    echo "=== ${name}: $*"
    local start=$SECONDS rc=0
    timeout "$STEP_TIMEOUT" "$@" || rc=$?
    local took=$((SECONDS - start))
    STEPS+=("$name")
    CODES+=("$rc")
    TIMES+=("$took")
    if ((rc != 0)); then
        FAILED+=("$name")
        local why=""
        ((rc == 124)) && why=", timed out after ${STEP_TIMEOUT} s"
        echo "=== ${name}: FAILED (exit ${rc}${why}, ${took} s)"
    else
        echo "=== ${name}: ok (${took} s)"
    fi
}

# Both GPU kernel backends where this jax has Mosaic GPU (jax >= 0.12; GPU_BACKENDS overrides), Triton alone before.
GPU_BACKENDS=${GPU_BACKENDS:-$("$PYTHON" -c 'from optax_ext.kernels.backend import mosaic_gpu_available as a
print("mosaic_gpu triton" if a() else "triton")')}
read -r -a GPU_BACKEND_LIST <<<"$GPU_BACKENDS"
echo "GPU kernel backends timed: ${GPU_BACKENDS}"

# A test module that fails to import is reported (and fails this step) without hiding the other modules' tests.
step gpu_tests "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rs --continue-on-collection-errors tests \
    --junitxml="$OUT_DIR/gpu_tests_${DEVICE}.xml"
# One table per step: ours on every backend, Optax and torch's fused/foreach AdamW, in interleaved rounds.
step optimizer_step_clip_adamw "$PYTHON" benchmarks/optimizer_step.py --iters "$ITERS" \
    --backends "${GPU_BACKEND_LIST[@]}" --out "$OUT_DIR/optimizer_step_${DEVICE}.json"
step optimizer_step_adamw "$PYTHON" benchmarks/optimizer_step.py --no-clip --iters "$ITERS" \
    --backends "${GPU_BACKEND_LIST[@]}" --out "$OUT_DIR/optimizer_step_adamw_${DEVICE}.json"
for backend in "${GPU_BACKEND_LIST[@]}"; do
    step "normalization_${backend}" env OPTAX_EXT_BACKEND="$backend" "$PYTHON" benchmarks/normalization.py --full \
        --iters "$ITERS" --out "$OUT_DIR/normalization_${backend}_${DEVICE}.json"
done
step lowering_report "$PYTHON" benchmarks/lowering_report.py --out "$OUT_DIR/lowering_report_${DEVICE}.json"
step augment "$PYTHON" benchmarks/augment.py --iters "$ITERS" --out "$OUT_DIR/augment_${DEVICE}.json"
step state_memory "$PYTHON" benchmarks/state_memory.py --iters "$ITERS" --digits-seeds 1 \
    --out "$OUT_DIR/state_memory_${DEVICE}.json"

{
    printf '{\n  "device": "%s",\n  "date": "%s",\n  "steps": [\n' "$DEVICE_KIND" "$(date -u '+%Y-%m-%d %H:%M UTC')"
    for i in "${!STEPS[@]}"; do
        printf '    {"step": "%s", "exit_status": %d, "seconds": %d}%s\n' "${STEPS[$i]}" "${CODES[$i]}" "${TIMES[$i]}" \
            "$( ((i + 1 < ${#STEPS[@]})) && echo ,)"
    done
    printf '  ]\n}\n'
} >"$SUMMARY"

echo
echo "summary in ${SUMMARY}, log in ${LOG}"
if ((${#FAILED[@]})); then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all ${#STEPS[@]} steps passed"
