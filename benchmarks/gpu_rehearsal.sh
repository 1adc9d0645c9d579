#!/usr/bin/env bash
# The GPU rehearsal: what a lent GPU machine runs in one go, each part under its own time limit, ours first so
# that flash-linear-attention's autotuning can never hide our rows. Logs and the benchmarks' JSON go to $OUT.
#   1. tests/modrwkv_kernels on CUDA (both Triton backends);
#   2. benchmarks/phase2_throughput.py: phase II training steps at the paper's 0.4B shape, per backend;
#   3. benchmarks/wkv7_kernels.py: ours step by step, ours chunked, fla's chunk_rwkv7; B=8, H=12, N=64, bf16;
#   4. the fla backend's tests (when fla-core is carried).
# The machine has no network: wheels in .whl/ (flash-linear-attention's fla-core) install from there.
#   OUT=/some/dir benchmarks/gpu_rehearsal.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

part() {  # part NAME SECONDS COMMAND...: run it under a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started))s"
}
# fla autotunes on first use of each shape and dtype (about 90 s each on a bare H200): its test and rows go last
part kernel_tests "${KERNEL_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/modrwkv_kernels -k "not fla"
part phase2_throughput "${PHASE2_S:-150}" python3 benchmarks/phase2_throughput.py --out "$OUT"
part wkv7_kernels "${KERNELS_S:-200}" python3 benchmarks/wkv7_kernels.py --no-cpu --peak-gbs 4800 --out "$OUT"
part fla_tests "${FLA_TESTS_S:-60}" python3 -m pytest -q -p no:cacheprovider tests/modrwkv_kernels -k fla
