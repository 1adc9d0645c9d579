"""The Triton wkv7 kernels compiled for NVIDIA GPUs on a machine without one: each backend's forward and backward
run through its autograd function as training calls them, with Triton's active driver replaced by one that names
the target GPU and each launch turned into a compile (`JITFunction.warmup`'s path). Triton lowers to PTX and the
`ptxas` its wheel ships assembles the cubin, so what only the real compiler checks (types, layouts of `tl.dot`
operands, shared memory per block) is checked here; nothing runs. An autotuned kernel compiles every launch it
would time (its timer replaced by one that calls each once, timing nothing; nothing kept on disk). Prints one JSON
line per compiled kernel and launch: {"kernel", "arch", "dtype", "launch" (its tuned settings and warps), "shared",
"cubin_bytes", "registers", "stack"} (registers a thread and its stack frame in bytes, as `cuobjdump` reads them
from the cubin: a stack above zero is registers spilled to local memory).

    python tests/modrwkv_kernels/cuda_compile.py 90:bfloat16,float32 80:bfloat16   # capability:input dtypes

Run it in a process of its own without TRITON_INTERPRET (the interpreter replaces the kernels)."""

import json
import re
import subprocess
import sys
import tempfile

import torch
import triton.runtime.driver as active_driver
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


class TargetOnly:
    """The part of a Triton driver that compiling reads: the device, its stream and the target GPU."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def call_once(kernel_call, quantiles):
    """An autotuner's timer that calls each launch once, compiling it, and times nothing: every launch ties."""
    kernel_call()
    return [0.0] * len(quantiles)


def resource_usage(cubin: bytes) -> dict:
    """{"registers", "stack"} of the kernel in `cubin`, as cuobjdump reads them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
    return {name: int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for name, key in (("registers", "REG"),
                                                                                      ("stack", "STACK"))}


def compile_backends(capability: int, dtype: torch.dtype, B=1, T=40, H=2, N=64) -> list[dict]:
    """Every kernel the two Triton backends launch for a forward and backward at `dtype`, each launch an
    autotuned one may choose, compiled for sm_<capability>."""
    from modrwkv_kernels.wkv7 import triton_chunked, triton_kernel

    for module in (triton_chunked, triton_kernel):  # a launch chosen for another target is chosen again
        for tuned in vars(module).values():
            if isinstance(tuned, Autotuner):
                tuned.cache.clear()
                tuned.cache_results = False  # its stand-in timings are none to keep
                tuned.__dict__["do_bench"] = call_once  # over its `do_bench`

    compiled, launch, targeted = {}, JITFunction.run, set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        if self not in targeted:  # each kernel keeps the target it first compiled for, per device
            self.device_caches.clear()
            targeted.add(self)
        if callable(grid):  # evaluated as a launch evaluates it (the chunked backward reads what its grid noted)
            grid(kwargs)
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        tuned = {name: kwargs[name] for name in ("BLOCK_V", "num_warps") if name in kwargs}
        row = {"kernel": self.__name__, "arch": f"sm_{capability}", "dtype": str(dtype).split(".")[-1],
               "launch": tuned, "shared": kernel.metadata.shared, "cubin_bytes": len(kernel.asm["cubin"])}
        compiled[json.dumps(row)] = {**row, **resource_usage(kernel.asm["cubin"])}  # the chosen one runs twice
        return kernel

    JITFunction.run = compile_only
    active_driver.set_active(TargetOnly(capability))
    try:
        for backend in (triton_kernel.wkv7_triton, triton_chunked.wkv7_triton_chunked):
            inputs = [torch.randn(B, T, H, N, dtype=dtype, requires_grad=True) for _ in range(6)]
            initial = torch.zeros(B, H, N, N, requires_grad=True)
            y, state = backend(*inputs, initial_state=initial)  # outputs unwritten: nothing ran
            (y.float().sum() + state.sum()).backward()
    finally:
        JITFunction.run = launch
    return list(compiled.values())


if __name__ == "__main__":  # capability:dtype,... e.g. 90:bfloat16,float32 80:bfloat16
    for target in sys.argv[1:]:
        capability, dtypes = target.split(":")
        for dtype in dtypes.split(","):
            for row in compile_backends(int(capability), getattr(torch, dtype)):
                print(json.dumps(row), flush=True)
