#!/usr/bin/env bash
# The GPU checks and benchmarks of the fast attention path and the training step, in as few calls as possible.
#
#   bash bench/gpu_session.sh wheels   # on a machine with PyPI access: the pure-Python packages the GPU image lacks
#                                      #   (omegaconf + antlr4 for pretrain.settings, disentangled-flash, the peer)
#   bash bench/gpu_session.sh kernel   # on the GPU: kernel tests compiled for the card, attention-core benchmark,
#                                      #   and the 200-step loss check of the fast path against the reference (~6 min)
#   bash bench/gpu_session.sh step 512 32    # on the GPU: the training-step benchmark against HuggingFace at one
#   bash bench/gpu_session.sh step 2048 8    #   sequence length and batch size per call (each under 10 minutes)
#
# Results go to $OUT (default bench/results): *.json, *.log. The GPU image needs no network: it has torch, triton,
# transformers, lightning and pytest; the wheels from the first stage travel in .whl/ (git-ignored) and are
# installed into /tmp/site. On a machine with the project installed (`pip install -e .`) the wheels are not needed.
set -euo pipefail
stage=${1:?usage: bash bench/gpu_session.sh wheels|kernel|step SEQ BATCH}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

use_wheels() {
    if [ -d .whl ] && ! python3 -c "import omegaconf" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    nvidia-smi -L | tee "$OUT/device.log"
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/device.log"
}

case "$stage" in
wheels)
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
        omegaconf==2.3.0 disentangled-flash==1.1.1
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only on PyPI; pure Python
    ls -la .whl
    ;;
kernel)
    use_wheels
    python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py 2>&1 | tee "$OUT/gpu_kernel_tests.log"
    python3 bench/attention_bench.py --out "$OUT/attention_bench.json" 2>&1 | tee "$OUT/attention_bench.log"
    python3 bench/gpu_step_bench.py --contestants ours_mlm --seq-lens 512 --batch-sizes 32 --steps 5 --warmup 3 \
        --check-steps 200 --out "$OUT/loss_check.json" 2>&1 | tee "$OUT/loss_check.log"
    ;;
step)
    seq=${2:?step needs a sequence length and a batch size, e.g. step 512 32}
    batch=${3:?step needs a batch size}
    use_wheels
    python3 bench/gpu_step_bench.py --seq-lens "$seq" --batch-sizes "$batch" --out "$OUT/gpu_step_bench_$seq.json" \
        2>&1 | tee "$OUT/gpu_step_bench_$seq.log"
    ;;
*)
    echo "unknown stage '$stage': use wheels, kernel or step" >&2
    exit 2
    ;;
esac
