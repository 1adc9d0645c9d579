#!/usr/bin/env bash
# What benchmarks/gpu_rehearsal.sh needs carried to a lent GPU machine, made here (this machine's package index, the
# project's .venv): the wheels its image lacks, in .whl/ (cp312, manylinux x86_64), and the demo's cache entries
# with their yaml list, in runs/gpu_demo/ (encoded first when missing: the demo's data, encoders and encodes, about
# five minutes). Then: carry ".whl" and "runs/gpu_demo" with the rehearsal's command.
#   benchmarks/gpu_rehearsal_inputs.sh [--no-caches]
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
# the image has torch, triton, transformers, safetensors and pytest; not these (at the lock's versions where locked)
# (typing_extensions: pydantic needs a newer one than an image may hold)
LOCKED="rwkv jiwer RapidFuzz hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions"
FLA=fla-core==0.6.0  # the fla rows: not in the lock (an optional backend)
PLATFORMS=""
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
           manylinux_2_34 manylinux_2_35; do
    PLATFORMS+=" --platform ${tag}_x86_64"
done

pin() {  # pin NAME: NAME==VERSION as requirements.lock has it
    local line
    line=$(grep -i -E "^$1==" requirements.lock) || { echo "$1 is not in requirements.lock" >&2; exit 1; }
    echo "$line"
}

[[ -x .venv/bin/python ]] || make .venv/.installed
# git's own path for it: in a worktree .git is a file, and writing under it stopped the script (set -e)
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx "/$WHEELS/" "$EXCLUDE" 2>/dev/null || echo "/$WHEELS/" >> "$EXCLUDE"
rm -rf "$WHEELS" && mkdir "$WHEELS"  # one version of each: two stop the machine's install
specs=("$FLA")
for name in $LOCKED; do specs+=("$(pin "$name")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d "$WHEELS" "${specs[@]}"
# PyPI has only DeepSpeed's source: a pure-Python wheel of it, ops compiled at run time (none are used there)
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$(pin deepspeed)"
echo "$WHEELS: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"

if [[ "${1:-}" != "--no-caches" ]]; then
    .venv/bin/python benchmarks/quality.py --write-caches runs/gpu_demo/caches.json
    echo "runs/gpu_demo: $(du -sh runs/gpu_demo | cut -f1)"
fi
# a call carries 64 MiB with the tracked tree (in bytes, as files are: du's MiB round each one up)
carry=("$WHEELS")
for extra in runs/gpu_demo runs/triton_autotune.tar.gz; do [[ -e $extra ]] && carry+=("$extra"); done
carried=$(du -sbc "${carry[@]}" | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -bc 2>/dev/null | awk '$2 == "total" {sum += $1} END {print sum + 0}')
room=$((64 * 1048576 - tree))
((carried <= room)) || { echo "${carry[*]} hold $((carried / 1024)) KiB, over the $((room / 1024)) KiB a call carries \
beside the tracked tree" >&2; exit 1; }
echo "carried: $((carried / 1024)) KiB of the $((room / 1024)) KiB beside the tracked tree"
