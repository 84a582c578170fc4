#!/usr/bin/env bash
# One GPU check that fits a lease: everything the first GPU session should learn, in at most 8 minutes from a cold
# Triton cache, on a bare GPU image (python3, torch, triton, transformers, pytest; no Hydra/omegaconf/Lightning/
# DeepSpeed/datasets needed, and no network).
#
#   bash bench/gpu_check.sh              # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run    # any CPU machine: every stage on CPU (Triton's interpreter), tiny shapes,
#                                        #   about two minutes (GPU_CHECK_DRY_RUN=1 does the same); CI runs this
#   GPU_CHECK_UNTIMED=1 bash bench/gpu_check.sh --dry-run
#                                        # the same without the time limits (the tests: a dry run beside other work
#                                        #   must pass or fail on what it computes, not on how busy the CPU is); the
#                                        #   report still lists each stage's limit and says they were not enforced.
#                                        #   Refused without --dry-run: the GPU check always enforces its limits.
#
# Stages, in order of value, each under its own `timeout` (seconds), every stage runs even when an earlier one fails:
#   environment       15   nvidia-smi, torch/triton/transformers versions
#   self_check       140   attention_backend=auto's self-check on CUDA: bf16, fp16 and fp32 at head size 64 and
#                          128, each with and without dropout, leading/interior/trailing/full padding, NaN-filled
#                          outputs, max_rel and elementwise tolerances (compiles the variants training and the
#                          tests use: a cold Triton cache fills here)
#   step_512         180   bench/gpu_step_bench.py at L=512, B=32, in this order: ours RTD and MLM compiled, HF-built
#                          RTD compiled, HF MLM compiled and eager (5 timed steps after 2 warm-up steps). Each row
#                          gets what is left of 170 s minus 15 s per row after it; a row past its share (a cold
#                          compile) says so and the next runs; a row of ours whose model did not run the fused
#                          kernel (a failed self-check falls back) is INVALID, and the stage fails
#   kernel_tests     120   tests/test_attention_gpu.py: kernel vs float64 and vs the same-dtype reference, outputs
#                          and every gradient (bf16/fp16/fp32, head size 64/128, L=512, L=200 for every pinned
#                          configuration, L=2048 once, padding of every kind, dropout variants)
#   attention_bench   60   bench/attention_bench.py at v3-base, B=32, 12 heads, L=512, d=64, bf16: ours vs flash
#                          SDPA without positions vs the reference, fwd+bwd
#   step_long      rest    if at least 60 s of the 480 s are left: long context, MLM, tokens/s and peak GPU memory
#                          (max_memory_allocated, reset at each row) per row, in this order of value: ours at L=2048
#                          B=8, ours at L=4096 B=4 (the same 16k tokens a step), then HF compiled at 2048 and 4096,
#                          then HF + disentangled-flash at 2048 and 4096 (skipped unless the package is importable).
#                          A baseline that runs out of memory reports `oom: <allocator message>` and the peak it
#                          reached, and the stage goes on (an oom of ours fails the stage). Every contestant gets
#                          max_position_embeddings=L with max_relative_positions=512 (the 512 model's buckets)
# GPU_CHECK_STAGES="self_check step_512" runs only the stages named (the environment always runs).
# Total budget 480 s. The fixed limits add up to 515 s (under a 540 s lease with the report), so step_long runs
# only on what the earlier stages left unused (at most 240 s); the report says when it was skipped. Row shares keep
# 15 s for each later row that runs (a skipped row keeps none), so the rows of ours get the time first.
#
# Results in $OUT (default bench/results): gpu_check.json (per stage: status, seconds, limit, key figures) and
# gpu_check.md (the same as one table), plus each stage's log and JSON. Optional wheels: a carried .whl/ directory
# is installed into /tmp/site first (pytest if the image lacks it, disentangled-flash for its long-context rows); the check
# itself needs none, and the script says so when .whl/ is absent.
set -u -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "unknown argument '$arg' (use --dry-run or nothing)" >&2; exit 2 ;;
    esac
done
UNTIMED=${GPU_CHECK_UNTIMED:-0}
if [ "$UNTIMED" != 0 ] && [ "$DRY_RUN" != 1 ]; then
    echo "error: GPU_CHECK_UNTIMED=$UNTIMED applies only to the dry run (--dry-run); unset it: the GPU check always" \
         "enforces its time limits" >&2
    exit 2
fi
OUT=${OUT:-$REPO/bench/results}
PYTHON=${PYTHON:-python3}
TOTAL_BUDGET=480
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute, as given relative to the caller's directory
cd "$REPO"
STAGES="$OUT/gpu_check_stages.tsv"
: > "$STAGES"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
CACHE=${GPU_CHECK_CACHE:-/tmp/gpu_check_cache}  # compiled kernels and graphs shared by the stages (and a rerun)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE/inductor}
WANTED=" environment ${GPU_CHECK_STAGES:-self_check step_512 kernel_tests attention_bench step_long} "
if [ "$DRY_RUN" = 1 ]; then
    export GPU_CHECK_DRY_RUN=1 TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi
START=$(date +%s)

install_wheels() {
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        echo "installing the carried wheels into /tmp/site: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || echo "WARNING: installing the wheels from .whl/ failed; continuing without them"
        export PYTHONPATH=$PYTHONPATH:/tmp/site
    else
        echo "no .whl/ directory: nothing installed (the check needs no wheels; without pytest in the image the" \
             "kernel_tests stage fails, without disentangled-flash its long-context rows are skipped)"
    fi
}

# run_stage NAME LIMIT COMMAND...: run with a time limit, log to $OUT/NAME.log, record "name rc seconds limit".
run_stage() {
    local name=$1 limit=$2
    shift 2
    case "$WANTED" in *" $name "*) ;; *) skip_stage "$name" "$limit" "not in GPU_CHECK_STAGES"; return ;; esac
    echo "== $name (limit ${limit}s)"
    local t0=$(date +%s)
    # an untimed dry run: a duration of 0 disables `timeout`; the limit is still recorded in the report
    timeout -k 10 "$([ "$UNTIMED" = 1 ] && echo 0 || echo "$limit")" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local t1=$(date +%s)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((t1 - t0))" "$limit" >> "$STAGES"
    echo "   rc=$rc after $((t1 - t0))s; last lines of $OUT/$name.log:"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

skip_stage() {
    printf '%s\tskipped\t0\t%s\t%s\n' "$1" "$2" "$3" >> "$STAGES"
    echo "== $1 skipped: $3"
}

install_wheels 2>&1 | tee "$OUT/wheels.log"

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=(--device cpu)
    ATTN=(--device cpu --tiny)
    # our rows run the kernel in the interpreter (slow: one step, one sequence; 24 is not a multiple of a tile)
    STEP=(--device cpu --tiny --no-compile --steps 1 --warmup 0 --interpret-kernel)
    STEP_512=(--seq-lens 16 --batch-sizes 1)
    # the long-context rows at two tiny lengths (one tile, and a partial second one), in the GPU check's order
    LONG_ROWS=(ours_mlm:16x1 ours_mlm:24x1 hf_mlm_compiled:16x1 hf_mlm_compiled:24x1 hf_mlm_disentangled_flash:16x1
               hf_mlm_disentangled_flash:24x1)
    if [ "$UNTIMED" = 1 ]; then
        echo "untimed dry run (GPU_CHECK_UNTIMED=1): stage limits and row shares are recorded, not enforced"
    fi
else
    DEVICE=(--device cuda)
    ATTN=(--device cuda --shapes 32x512 --warmup 3 --repeats 10)
    STEP=(--device cuda --steps 5 --warmup 2)
    STEP_512=(--seq-lens 512 --batch-sizes 32)
    LONG_ROWS=(ours_mlm:2048x8 ours_mlm:4096x4 hf_mlm_compiled:2048x8 hf_mlm_compiled:4096x4
               hf_mlm_disentangled_flash:2048x8 hf_mlm_disentangled_flash:4096x4)
fi

run_stage environment 15 "$PYTHON" bench/gpu_check.py environment --out "$OUT/environment.json"
run_stage self_check 140 "$PYTHON" bench/gpu_check.py self-check "${DEVICE[@]}" --out "$OUT/self_check.json"
# --time-budget 0: no row shares (an untimed dry run)
row_budget() { if [ "$UNTIMED" = 1 ]; then echo 0; else echo "$1"; fi; }
run_stage step_512 180 "$PYTHON" bench/gpu_step_bench.py "${STEP[@]}" "${STEP_512[@]}" --out "$OUT/step_512.json" \
    --time-budget "$(row_budget 170)" --contestants ours_rtd ours_mlm hf_rtd_compiled hf_mlm_compiled hf_mlm_eager
run_stage kernel_tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_attention_gpu.py \
    --junitxml "$OUT/kernel_tests.xml"
run_stage attention_bench 60 "$PYTHON" bench/attention_bench.py "${ATTN[@]}" --out "$OUT/attention_bench.json"
left=$((TOTAL_BUDGET - ($(date +%s) - START) - 10))
[ "$UNTIMED" = 1 ] && left=240  # an untimed dry run always runs the last stage, under its full limit
limit=$((left < 240 ? left : 240))
if [ "$limit" -ge 60 ]; then
    run_stage step_long "$limit" "$PYTHON" bench/gpu_step_bench.py "${STEP[@]}" --rows "${LONG_ROWS[@]}" \
        --out "$OUT/step_long.json" --time-budget "$(row_budget $((limit - 10)))"
else
    skip_stage step_long "$limit" "only ${left}s of the ${TOTAL_BUDGET}s budget left"
fi

"$PYTHON" bench/gpu_check.py report --out "$OUT" --dry-run "$DRY_RUN" --total-seconds $(($(date +%s) - START)) \
    --budget "$TOTAL_BUDGET" --limits-enforced "$([ "$UNTIMED" = 1 ] && echo 0 || echo 1)"
