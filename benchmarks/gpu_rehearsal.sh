#!/usr/bin/env bash
# The GPU rehearsal: what a lent GPU machine runs in one go, each part under its own time limit and all of them
# inside one budget, so the command ends before the device's limit. Ours first: flash-linear-attention autotunes
# about 90 s per shape and dtype on a bare machine, so its parts go last and can never hide our rows.
#   kernel_tests        tests/modrwkv_kernels on CUDA (both Triton backends, fp32 and bf16), the model on CUDA vs CPU
#   deepspeed_tests     the DeepSpeed engine as workers run it, in one process: ZeRO-1 and 2 in bf16, fp32 gradient
#                       sums and fp32 feature statistics learns and saves (tests/pipelines/test_deepspeed_cuda.py);
#                       a micro-step of the core makes no synchronizing CUDA call (test_trainer_cuda.py); host
#                       features reach a model on the GPU (test_multimodal.py)
#   demo_quality        the demo suite trained (the core, bf16, Triton kernels) and evaluated on the GPU in one
#                       process, 3 seeds, from copies of the demo's caches carried in runs/gpu_demo (no data or
#                       encoders there; `python benchmarks/quality.py --write-caches runs/gpu_demo/caches.json`);
#                       about a minute a seed on an H200 (phase I took 16 s at 150 steps; 300 since 2026-12-05)
#   encoder_throughput  the paper's frozen encoders (SigLIP2, Whisper), random weights at their real size: the
#                       model's forward on the GPU apart from the host half the encode job's decode tasks run, then
#                       the forward fed by 8 processes running that half (the encode job's rate per GPU)
#   wavlm_batching      WavLM Base (real size, random weights) on clips of unequal length: each clip's whole model
#                       alone against the shipped forward (convolutions alone, the transformer batched)
#   wkv7_kernels        ours chunked (its launch chosen by timing, logged), the decode steps, fla's chunk_rwkv7,
#                       ours step by step and chunked in tf32x3; B=8, H=12, N=64, bf16
#   fla_tests           the fla backend against ours (when fla-core is carried)
#   phase2_fla          phase II steps at the paper's 0.4B shape, ours chunked beside fla
#   phase2_ckpt         the same step of ours with gradient checkpointing off and on: peak GiB and tokens/s, and
#                       where each step's device time goes (torch's profiler: top kernels, device busy share)
#   phase2_compile      the same step eager and with the backbone's blocks under torch.compile, profiled
# The machine has no network and its image lacks some of our packages: wheels in .whl/ install from there, and the
# demo part reads copies of the demo's caches in runs/gpu_demo. `benchmarks/gpu_rehearsal_inputs.sh` makes both here
# (fla-core for the fla rows, rwkv for the World vocabulary file, jiwer and RapidFuzz for WER, DeepSpeed with hjson
# and pydantic's packages; the six cache entries with only the features they use): carry ".whl" and "runs/gpu_demo".
# Logs and every benchmark's JSON are packed into $OUT/rehearsal.tar.gz after each part (what comes back is counted
# in files), and all that is printed goes to $OUT/console.log as it is printed. deepspeed_tests and demo_quality
# refuse to start without the carried inputs (exit 3). Triton's autotuning results (fla's took its parts' whole
# limits twice) are kept on disk and packed into $OUT/triton_autotune.tar.gz after each part; copied here to
# runs/triton_autotune.tar.gz and carried, they are reused by the next lent machine (same image: the cache key holds
# Triton's version, the GPU's architecture (not its model: an H100's choice is an H200's), each kernel's source and
# shapes), which then compiles only each kernel's chosen config (ours too: the chunked kernels' launches).
#   OUT=/some/dir [PARTS="kernel_tests demo_quality"] [SEEDS="0 1 2"] [BUDGET_S=420] benchmarks/gpu_rehearsal.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-benchmarks/out/gpu}")  # absolute: the autotuning results are packed from another folder
LOGS=$(mktemp -d)
ALL_PARTS="kernel_tests deepspeed_tests demo_quality encoder_throughput wavlm_batching wkv7_kernels"
ALL_PARTS+=" fla_tests phase2_fla phase2_ckpt phase2_compile"
PARTS=${PARTS:-$ALL_PARTS}
for name in $PARTS; do  # a mistyped part ran nothing and brought nothing back: the machine's start spent for none
    [[ " $ALL_PARTS " == *" $name "* ]] || { echo "== unknown part $name; the parts: $ALL_PARTS"; exit 2; }
done
# the parts that read what gpu_rehearsal_inputs.sh made here (the wheels; the demo's caches too): without it (not
# carried, or made in another checkout) each would fail on its first import or file, on the device's time
missing=""
for name in deepspeed_tests demo_quality; do
    [[ " $PARTS " == *" $name "* ]] || continue
    compgen -G ".whl/*.whl" >/dev/null || missing+=" $name: .whl/;"
    [[ $name == demo_quality && ! -f runs/gpu_demo/caches.json ]] && missing+=" $name: runs/gpu_demo/caches.json;"
done
if [[ -n $missing ]]; then
    echo "== not carried (benchmarks/gpu_rehearsal_inputs.sh makes them):$missing stopping"
    exit 3
fi
DEADLINE=$((SECONDS + ${BUDGET_S:-420}))
mkdir -p "$OUT"
# everything printed, as it is printed: what a part had written survives a cut by the device's own limit
exec > >(tee "$OUT/console.log") 2>&1
console=$!
trap 'exec >&- 2>&-; wait $console' EXIT  # the last lines written before the script ends
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# one folder for every call on the machine: a second call while it is still warm compiles nothing again
# TRITON_PRINT_AUTOTUNING: each kernel's timing of its launches logged, with the launch chosen and how long it took
export TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/modrwkv-triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
[[ -f runs/triton_autotune.tar.gz ]] && tar xzf runs/triton_autotune.tar.gz -C "$TRITON_CACHE_DIR"
# a failed install stops here, not minutes later at the first import of what it lacks
if compgen -G ".whl/*.whl" >/dev/null; then
    timeout 120 python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        || { echo "== the wheels in .whl did not install: stopping"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    timeout 120 python3 -c "import deepspeed, jiwer, rapidfuzz, rwkv" \
        || { echo "== a carried package does not import: stopping"; exit 1; }
fi
{ timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  timeout 60 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$LOGS/machine.log"
tar czf "$OUT/rehearsal.tar.gz" -C "$LOGS" .  # the machine's line comes back, whatever the parts do

LINE_BUFFERED=$(command -v stdbuf >/dev/null && echo "stdbuf -oL")  # coreutils' stdbuf, where the image has it
part() {  # part NAME SECONDS COMMAND...: run it under its limit (or what is left of the budget), log, pack
    local name=$1 limit=$2 started=$SECONDS left=$((DEADLINE - SECONDS))
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    if ((left < 20)); then echo "== $name: skipped, ${left}s of the budget left"; return 0; fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit}s)"
    # line-buffered all along: a part the device's own limit cuts short still leaves its lines in the log
    timeout -k 10 "$limit" "$@" 2>&1 | $LINE_BUFFERED tr '\r' '\n' | grep --line-buffered -v '^\s*$' \
        | tee "$LOGS/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started))s" | tee -a "$LOGS/$name.log"
    tar czf "$OUT/rehearsal.tar.gz" -C "$LOGS" .
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/triton_autotune.tar.gz" -T -)
}
# -v: each test's outcome as it ends (a part its limit cuts short prints no summary)
# (not the cross-compile check: it stands in for a GPU where there is none)
part kernel_tests 150 python3 -m pytest -v -p no:cacheprovider tests/modrwkv_kernels tests/modrwkv/test_model_cuda.py \
    -k "not fla and not cuda_compile"
# the parts that do not time the kernel run its first launch pinned: no compile and timing of four per key
PINNED="env MODRWKV_WKV7_LAUNCH=32,4"
part deepspeed_tests 150 $PINNED python3 -m pytest -v -p no:cacheprovider tests/pipelines/test_deepspeed_cuda.py \
    tests/pipelines/test_trainer_cuda.py tests/modrwkv/test_multimodal.py -k "cuda or deepspeed or on_the_gpu"
part demo_quality 280 $PINNED python3 benchmarks/quality.py --suites demo --single-process --untracked \
    --caches runs/gpu_demo/caches.json --seeds ${SEEDS:-0 1 2} --out "$LOGS"
part encoder_throughput 120 python3 benchmarks/encoder_throughput.py --out "$LOGS"
part wavlm_batching 60 python3 benchmarks/wavlm_batching.py --out "$LOGS"
# the card's own bandwidth; 300 s: our chunked kernels compile and time four launches a key on a bare machine
part wkv7_kernels 300 python3 benchmarks/wkv7_kernels.py --no-cpu --out "$LOGS"
part fla_tests 150 python3 -m pytest -q -p no:cacheprovider tests/modrwkv_kernels -k fla
part phase2_fla 150 python3 benchmarks/phase2_throughput.py --backends triton_chunked fla --out "$LOGS"
part phase2_ckpt 120 python3 benchmarks/phase2_throughput.py --backends triton_chunked --checkpointing off on \
    --profile --out "$LOGS/checkpointing"
part phase2_compile 150 python3 benchmarks/phase2_throughput.py --backends triton_chunked --compile off on \
    --profile --out "$LOGS/compile"
