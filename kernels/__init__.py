"""The wkv7 time-mix recurrence behind one dispatch function.

`wkv7(r, w, k, v, a, b, initial_state=None, backend=None) -> (y, final_state)`, tensors [B, T, H, N], `w` in
RWKV-LM's form (per-step decay exp(-exp(w))), state [B, H, N, N] (value dim x key dim) carried in fp32:

    S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T,     y_t = S_t r_t

Backends, each beside its reference in `kernels/wkv7/`:
- "reference": the plain per-step recurrence (also the default for a single decode step);
- "chunked":   exact chunked matrix form in PyTorch, the default on CPU;
- "triton":    Triton forward/backward kernels, the default on CUDA (on CPU only under TRITON_INTERPRET=1).
The environment variable MODRWKV_WKV7_BACKEND forces one.
"""

import os

import torch

from .wkv7 import wkv7_chunked, wkv7_reference

BACKEND_ENV = "MODRWKV_WKV7_BACKEND"


def _triton(*args):
    # Imported on first use: defining Triton kernels needs a GPU driver or TRITON_INTERPRET=1.
    if args[0].device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton wkv7 backend runs on CPU tensors only with TRITON_INTERPRET=1 set before start")
    from .wkv7.triton_kernel import wkv7_triton

    return wkv7_triton(*args)


BACKENDS = {"reference": wkv7_reference, "chunked": wkv7_chunked, "triton": _triton}

__all__ = ["BACKENDS", "BACKEND_ENV", "default_backend", "wkv7", "wkv7_chunked", "wkv7_reference"]


def default_backend(device: torch.device, seq_len: int) -> str:
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        return forced
    if device.type == "cuda":
        return "triton"
    return "reference" if seq_len == 1 else "chunked"  # one decode step is the recurrence itself


def wkv7(r, w, k, v, a, b, initial_state=None, backend=None):
    """Returns y in the dtype of `r` and the final state in fp32 (fp64 for fp64 inputs on the torch backends)."""
    shape = r.shape
    if r.dim() != 4:
        raise ValueError(f"wkv7 expects [B, T, H, N] tensors, got r of shape {tuple(shape)}")
    for name, x in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.shape != shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} like r")
    B, _, H, N = shape
    if initial_state is not None and initial_state.shape != (B, H, N, N):
        raise ValueError(f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, N, N)}")
    name = backend or default_backend(r.device, shape[1])
    if name not in BACKENDS:
        raise ValueError(f"wkv7: unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    y, state = BACKENDS[name](r, w, k, v, a, b, initial_state)
    return y.to(r.dtype), state
