#!/usr/bin/env bash
# Everything one GPU session checks, as one command (the device tool, or any CUDA machine):
#
#   OUT=DIR bash scripts/gpu_check.sh
#
# 1. installs this checkout without dependencies (a CUDA image already holds torch, triton,
#    transformers and peft; nothing is downloaded);
# 2. runs the Triton kernel tests on the GPU (TRITON_INTERPRET=0) against the fp64 references;
# 3. runs the CUDA kernel benchmark (benchmarks/kernels_cuda.py): every kernel checked at the
#    benchmark shapes, then timed against SDPA (and fla's chunk_gla when installed), its report
#    rewritten after each shape.
#
# Logs and the report land in $OUT (8 files at most). LINEARIZE_AUTOTUNE=0 (the default here)
# compiles each kernel once with a fixed launch; LINEARIZE_AUTOTUNE=1 tunes (minutes per shape).
# DRY_RUN=1 runs the same steps on the CPU in the Triton interpreter, at a tiny benchmark shape.
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LINEARIZE_AUTOTUNE=${LINEARIZE_AUTOTUNE:-0}
if [ "${DRY_RUN:-0}" = 1 ]; then
    export TRITON_INTERPRET=1
    BENCH_ARGS=(--dry-run --repeats 1 --warmup 0 --check-tokens 40)
else
    export TRITON_INTERPRET=0
    BENCH_ARGS=(--repeats "${REPEATS:-10}" --lengths ${LENGTHS:-2048 4096 8192 16384})
fi

{
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 \
        || { cat "$OUT/install.txt"; echo "install failed"; exit 1; }
fi

status=0
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider tests/kernels/test_triton_gla.py \
    tests/kernels/test_triton_window.py tests/kernels/test_triton_hybrid.py 2>&1 | tee "$OUT/pytest_kernels.txt" || status=1
timeout "${BENCH_TIMEOUT:-300}" $PY benchmarks/kernels_cuda.py --out "$OUT/kernels_cuda" "${BENCH_ARGS[@]}" \
    2>&1 | tee "$OUT/bench.txt" || status=1
exit $status
