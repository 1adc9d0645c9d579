"""The Triton kernels compile for the GPUs users train on, checked on a machine without one (`cuda_compile.py`):
the interpreter that runs them on CPU here checks neither Triton's types and `tl.dot` layouts nor the shared
memory a block needs, which only the real compiler does. H100/H200 (sm_90, wgmma) at the training dtype and
fp32, A100 (sm_80, mma) at the training dtype; each launch the chunked kernels' autotuning may choose."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modrwkv_kernels.wkv7.triton_chunked import LAUNCH_ENV, LAUNCHES

REPO = Path(__file__).resolve().parents[2]
KERNELS = {"_wkv7_fwd_kernel", "_wkv7_bwd_kernel", "_chunk_fwd_kernel", "_chunk_bwd_kernel"}
SHARED_PER_BLOCK = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}  # the most a block may opt in to (CUDA's tables)


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_hopper_and_ampere_within_their_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", LAUNCH_ENV)}  # every launch
    env.update(PYTHONPATH=str(REPO))
    rows = []
    # the two targets side by side, one process each (ptxas runs on one core; the suite on one of two)
    compiling = [subprocess.Popen([sys.executable, str(REPO / "tests/modrwkv_kernels/cuda_compile.py"), target],
                                  env={**env, "TRITON_CACHE_DIR": str(tmp_path / target.replace(":", "_"))},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # a fresh cache each
                 for target in ("90:bfloat16,float32", "80:bfloat16")]
    for process in compiling:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-4000:]
        rows += [json.loads(line) for line in out.splitlines()]
    compiled = {(r["kernel"], r["arch"], r["dtype"]) for r in rows}
    assert compiled == {(k, arch, dtype) for k in KERNELS
                        for arch, dtype in (("sm_90", "bfloat16"), ("sm_90", "float32"), ("sm_80", "bfloat16"))}
    launches = {(launch.kwargs["BLOCK_V"], launch.num_warps) for launch in LAUNCHES}
    for kernel, arch, dtype in compiled:  # every launch the GPU's autotuning may choose (N = 64: none clamped)
        if kernel.startswith("_chunk"):
            assert {(r["launch"]["BLOCK_V"], r["launch"]["num_warps"]) for r in rows
                    if (r["kernel"], r["arch"], r["dtype"]) == (kernel, arch, dtype)} == launches
    for row in rows:
        assert row["cubin_bytes"] > 0 and row["shared"] <= SHARED_PER_BLOCK[row["arch"]], row
        assert 0 < row["registers"] <= 255 and row["stack"] >= 0, row
