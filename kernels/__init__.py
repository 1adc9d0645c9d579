"""The wkv7 time-mix recurrence behind one dispatch function.

`wkv7(r, w, k, v, a, b, initial_state=None, backend=None) -> (y, final_state)`, tensors [B, T, H, N], `w` in
RWKV-LM's form (per-step decay exp(-exp(w))), state [B, H, N, N] (value dim x key dim) carried in fp32:

    S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T,     y_t = S_t r_t

Backends: "reference" (per step; the default for single decode steps), "chunked" (matrix form, the CPU
default). The environment variable `MODRWKV_WKV7_BACKEND` forces one.
"""

import os

import torch

from .wkv7 import wkv7_chunked, wkv7_reference

__all__ = ["BACKENDS", "BACKEND_ENV", "default_backend", "wkv7", "wkv7_chunked", "wkv7_reference"]

BACKENDS = {"reference": wkv7_reference, "chunked": wkv7_chunked}
BACKEND_ENV = "MODRWKV_WKV7_BACKEND"


def default_backend(device: torch.device, seq_len: int) -> str:
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        return forced
    return "reference" if seq_len == 1 else "chunked"  # one decode step is the recurrence itself


def wkv7(r, w, k, v, a, b, initial_state=None, backend=None):
    """Returns y in the dtype of `r` and the final state in fp32 (fp64 for fp64 inputs)."""
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
