#!/usr/bin/env bash
# One GPU session's checks in one command, planned for 8 minutes on an H200 including the build.
#
#   bash benchmarks/gpu_validate.sh [--dry-run] [OUT_DIR]
#
# Stages, each under its own `timeout` (a hang costs that stage's limit, never the session; the
# limits add up to 590 s, under the device tool's 600 s per command), each writing into OUT_DIR (default $OUT/gpu-validate, else benchmarks/results/gpu-validate):
#   env          GPU, driver, versions                                  env.json
#   build        the CUDA extension for sm_90 (MAX_JOBS=16)             build.log
#   info         python -m memformer_fast info                          info.log
#   tests        kernels, ops, replay buffer, model on Triton (CUDA)    tests.log
#   correctness  realistic shapes, bf16/fp16/fp32, NaN-poisoned outputs correctness.json
#   kernels      each kernel's time against its floor, SDPA baseline    kernels.json
#   compiled     the ops chained: eager vs torch.compile vs CUDA graphs compiled.json
#   training     one MRBP step of the paper's model, T 4/16, offload    training.json
#   report       results.json and results.md (GPU, driver, versions, date, command)
# A stage that fails or times out is recorded (stages.jsonl) and the next one still runs; the exit
# status is non-zero when any stage failed. --dry-run runs the same stages on the CPU through the
# Triton interpreter at tiny shapes, skipping the build (it uses the installed one): CI runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
OUT_DIR="${1:-${OUT:+$OUT/gpu-validate}}"
OUT_DIR="${OUT_DIR:-benchmarks/results/gpu-validate}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/stages.jsonl"
COMMAND="bash benchmarks/gpu_validate.sh $*"
PY="${PYTHON:-python}"
FLAGS=()
if ((DRY_RUN)); then
    FLAGS=(--dry-run)
    COMMAND="bash benchmarks/gpu_validate.sh --dry-run $*"
    export TRITON_INTERPRET=1
fi
FAILED=0
# The interpreter on two shared CPU cores is slow: a dry run's limits are four times the GPU's.
SCALE=$((DRY_RUN ? 4 : 1))

# stage NAME LIMIT_SECONDS COMMAND...: run under `timeout` (x SCALE), log to OUT_DIR/NAME.log.
stage() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local seconds=$((SECONDS - start))
    ((rc == 0)) || FAILED=1
    ((rc == 124)) && echo "   timed out after ${limit}s"
    echo "   exit $rc, ${seconds}s"
    tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/   | /'
    printf '{"stage": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' \
        "$name" "$rc" "$seconds" "$limit" >> "$OUT_DIR/stages.jsonl"
}

stage env 30 "$PY" benchmarks/gpu_validate.py env --out "$OUT_DIR" "${FLAGS[@]}"
if ((DRY_RUN)); then
    echo "== build: skipped in a dry run (the installed build is used)"
else
    stage build 150 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
stage info 30 "$PY" -m memformer_fast info
if ((DRY_RUN)); then
    # The same invocation on one quick test per file: proves the command, not the kernels.
    stage tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        tests/test_ops.py tests/test_replay.py tests/test_model_triton.py \
        -k "(test_memory_read and float32 and B2-L17) or test_extension_is_built or test_write_all_padding"
else
    stage tests 160 "$PY" -m pytest -q -p no:cacheprovider -x tests/test_kernels.py \
        tests/test_ops.py tests/test_replay.py tests/test_model_triton.py
fi
stage correctness 60 "$PY" benchmarks/gpu_validate.py correctness --out "$OUT_DIR" "${FLAGS[@]}"
stage kernels 60 "$PY" benchmarks/gpu_validate.py kernels --out "$OUT_DIR" "${FLAGS[@]}"
stage compiled 50 "$PY" benchmarks/gpu_validate.py compiled --out "$OUT_DIR" "${FLAGS[@]}"
stage training 50 "$PY" benchmarks/gpu_validate.py training --out "$OUT_DIR" "${FLAGS[@]}"
"$PY" benchmarks/gpu_validate.py report --out "$OUT_DIR" --command "$COMMAND" "${FLAGS[@]}" \
    > /dev/null || FAILED=1
echo "== wrote $OUT_DIR/results.json and $OUT_DIR/results.md"
exit "$FAILED"
