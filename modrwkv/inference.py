"""Inference-only preparation of a model (RWKV7 or ModRWKV): what chat, `generate` and evaluation apply after
loading. Training never calls it: distributed engines (DeepSpeed) flatten and broadcast parameters as raw
memory, which needs the usual contiguous weights."""

import torch
import torch.nn as nn


def prepare_for_inference(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Eval mode, `dtype` if given, then the CPU-fastest weight layout (in place; returns the model). Call it
    last: a later `.to(dtype)` keeps each weight's memory layout, which may then be the slow one for that dtype."""
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if next(model.parameters()).device.type == "cpu":
        lay_out_linear_weights(model)
    return model


def lay_out_linear_weights(model: nn.Module) -> None:
    """Chooses each linear weight's memory layout (values and shape [out, in] unchanged) for CPU BLAS speed:
    in fp32, square and tall matrices stored transposed ([in, out] contiguous) stream faster here (decoding
    reads the 200 MB head of the 0.1B model 1.45x faster; prefill GEMMs are as fast or faster); in bf16 that
    layout is ~5x slower, so every other dtype keeps the usual row-major layout."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            want_transposed = w.dtype == torch.float32 and module.out_features >= module.in_features
            is_transposed = w.stride() == (1, w.shape[0]) and w.shape[0] > 1
            if want_transposed and not is_transposed:
                w.data = w.data.t().contiguous().t()
            elif is_transposed and not want_transposed:
                w.data = w.data.contiguous()
