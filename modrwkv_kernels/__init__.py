"""The wkv7 time-mix recurrence behind one dispatch function.

`wkv7(r, w, k, v, a, b, initial_state=None, backend=None) -> (y, final_state)`, tensors [B, T, H, N], `w` in
RWKV-LM's form (per-step decay exp(-exp(w))), state [B, H, N, N] (value dim x key dim) carried in fp32:

    S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T,     y_t = S_t r_t

Backends, each beside its reference in `modrwkv_kernels/wkv7/`:
- "reference": the plain per-step recurrence (also the CPU default for a single decode step; on CUDA one step
               runs "triton_chunked" like any length until the GPU decode rows in benchmarks/RESULTS.md decide);
- "chunked":   exact chunked matrix form in PyTorch, the default on CPU;
- "triton":    Triton forward/backward kernels walking the sequence step by step;
- "triton_chunked": Triton kernels in the chunked matrix form (`tl.dot` inside each chunk), the default on
               CUDA (on an H200 3.3x "triton" and 1.1x fla's chunk_rwkv7 forward+backward, bf16, T = 4k-16k);
- "fla":       flash-linear-attention's `chunk_rwkv7`, when that optional package is installed (GPU only).
The Triton backends run on CPU tensors only under TRITON_INTERPRET=1. The environment variable
MODRWKV_WKV7_BACKEND forces one.

Packed input (several sequences in one row, as flash-linear-attention takes it): `cu_seqlens`, a LongTensor
[S + 1] of segment offsets into T with B = 1, or its `PackedLayout` (`packed_layout(cu_seqlens, T)`), which a
model builds once per forward so that no layer reads the offsets back from the device. Each segment starts from zero state (or its row of an
`initial_state` [S, H, N, N]) and its final state is returned, [S, H, N, N]. Segments are padded at their end with
identity steps (no input, decay 1: w = -inf), dropped again afterwards: the chunked backend keeps them in one row,
each padded to whole chunks, and restarts the state at each segment's first chunk (so the recurrence costs about
the real tokens); the reference gets them as a batch, each padded to the longest. The Triton kernels take the
row as it is: one program per segment and head. Either way no state crosses a boundary by construction.
"""

import os

import torch

from .layout import (CHUNK, PackedLayout, as_layout, check_cu_seqlens, on_host, packed_layout, rows_layout,
                     to_device_nowait)
from .wkv7 import wkv7_chunked, wkv7_reference

BACKEND_ENV = "MODRWKV_WKV7_BACKEND"


def _check_triton_device(name, x):
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the {name} wkv7 backend runs on CPU tensors only with TRITON_INTERPRET=1 set before start")


# The Triton modules are imported on first use: defining Triton kernels needs a GPU driver or TRITON_INTERPRET=1.
def _triton(*args):
    _check_triton_device("triton", args[0])
    from .wkv7.triton_kernel import wkv7_triton

    return wkv7_triton(*args)


def _triton_chunked(*args):
    _check_triton_device("triton_chunked", args[0])
    from .wkv7.triton_chunked import wkv7_triton_chunked

    return wkv7_triton_chunked(*args)


def _fla(r, w, k, v, a, b, initial_state=None, layout=None):
    """flash-linear-attention's chunked kernel behind our contract: it takes the log-decay -exp(w) and keeps the
    state as key x value, ours value x key."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as error:
        raise RuntimeError("the fla wkv7 backend needs flash-linear-attention: pip install 'modrwkv[fla]'") from error
    w, k, v, a, b = (x.to(r.dtype) for x in (-torch.exp(w.float()), k, v, a, b))  # one dtype (autocast mixes)
    state = initial_state.float().transpose(-1, -2).contiguous() if initial_state is not None else None
    packed = {} if layout is None else {"cu_seqlens": layout.cu_seqlens,
                                        "cu_seqlens_cpu": torch.tensor(layout.offsets)}  # spares fla a sync
    y, final = chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=state,
                           output_final_state=True, **packed)
    return y, final.float().transpose(-1, -2)


BACKENDS = {"reference": wkv7_reference, "chunked": wkv7_chunked, "triton": _triton,
            "triton_chunked": _triton_chunked, "fla": _fla}
ROW_BACKENDS = ("triton", "triton_chunked", "fla")  # take a packed row as it is, with its offsets

__all__ = ["BACKENDS", "BACKEND_ENV", "CHUNK", "PackedLayout", "as_layout", "check_cu_seqlens",
           "default_backend", "on_host", "packed_layout", "rows_layout", "to_device_nowait", "wkv7", "wkv7_chunked",
           "wkv7_reference"]


def default_backend(device: torch.device, seq_len: int) -> str:
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        return forced
    if device.type == "cuda":
        return "triton_chunked"
    return "reference" if seq_len == 1 else "chunked"  # one decode step is the recurrence itself


# torch.compile of a model around it stops here: the kernels are compiled code of their own, and the packed
# layout's host-side lists would make Dynamo recompile for every row (benchmarks/RESULTS.md, torch.compile)
@torch.compiler.disable
def wkv7(r, w, k, v, a, b, initial_state=None, backend=None, cu_seqlens=None):
    """Returns y in the dtype of `r` and the final state in fp32 (fp64 for fp64 inputs on the torch backends)."""
    if cu_seqlens is not None:
        return wkv7_packed(r, w, k, v, a, b, initial_state, backend, cu_seqlens)
    check_shapes(r, w, k, v, a, b)
    shape = r.shape
    B, _, H, N = shape
    if initial_state is not None and initial_state.shape != (B, H, N, N):
        raise ValueError(f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, N, N)}")
    name = backend or default_backend(r.device, shape[1])
    if name not in BACKENDS:
        raise ValueError(f"wkv7: unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    with fp32_products(r):
        y, state = BACKENDS[name](r, w, k, v, a, b, initial_state)
    return y.to(r.dtype), state


def fp32_products(x: torch.Tensor):
    """Autocast off: the torch backends compute in fp32 (their inputs cast), which a caller's bf16 autocast would
    turn into bf16 products and, in the chunked form, a bf16 state; the Triton kernels choose their own precision."""
    return torch.autocast(x.device.type, enabled=False)


def segment_index(lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, position within it) of every packed step, for segments of these lengths laid end to end; built on
    the host, copied to `device` without waiting."""
    counts = torch.tensor(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    position = torch.arange(sum(lengths)) - (torch.cumsum(counts, 0) - counts)[segment]
    return to_device_nowait(segment, device), to_device_nowait(position, device)


def check_shapes(r, w, k, v, a, b) -> None:
    """[B, T, H, N] tensors all of r's shape (a kernel would read past the end of a shorter one)."""
    if r.dim() != 4:
        raise ValueError(f"wkv7 expects [B, T, H, N] tensors, got r of shape {tuple(r.shape)}")
    for name, x in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")


def wkv7_packed(r, w, k, v, a, b, initial_state, backend, cu_seqlens):
    check_shapes(r, w, k, v, a, b)
    if r.shape[0] != 1:
        raise ValueError(f"wkv7: packed input (cu_seqlens) is one row, [1, T, H, N]; got r of shape {tuple(r.shape)}")
    _, T, H, N = r.shape
    layout = as_layout(cu_seqlens, T, r.device)
    lengths = list(layout.lengths)
    S = len(lengths)
    if initial_state is not None and initial_state.shape != (S, H, N, N):
        raise ValueError(f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected {(S, H, N, N)}"
                         " (one row per segment)")

    name = backend or default_backend(r.device, max(lengths))
    if name in ROW_BACKENDS:  # the kernels read the offsets themselves
        y, state = BACKENDS[name](r, w, k, v, a, b, initial_state, layout)
        return y.to(r.dtype), state
    segment, position = segment_index(lengths, r.device)
    fills = [float("-inf") if x is w else 0.0 for x in (r, w, k, v, a, b)]
    if name == "chunked":  # one row, each segment padded to whole chunks
        chunks = [-(-n // CHUNK) for n in lengths]
        starts = torch.tensor([0, *chunks[:-1]]).cumsum(0) * CHUNK
        index = to_device_nowait(starts, r.device)[segment] + position
        inputs = [x.new_full((sum(chunks) * CHUNK, H, N), fill).index_put((index,), x[0])[None]
                  for x, fill in zip((r, w, k, v, a, b), fills)]
        with fp32_products(r):
            y, state = wkv7_chunked(*inputs, initial_state=initial_state, segment_chunks=chunks)
        return y[:, index].to(r.dtype), state

    def batched(x, fill):  # [1, T, H, N] -> [S, longest, H, N], each segment from step 0, `fill` after its end
        out = x.new_full((S, max(lengths), H, N), fill)
        return out.index_put((segment, position), x[0])

    y, state = wkv7(*(batched(x, fill) for x, fill in zip((r, w, k, v, a, b), fills)), initial_state=initial_state,
                    backend=name)
    return y[segment, position][None], state
