"""Inference-only preparation of a model (RWKV7 or ModRWKV): what chat, `generate` and evaluation apply after
loading. Training never calls it: distributed engines (DeepSpeed) flatten and broadcast parameters as raw
memory, which needs the usual contiguous weights.

`quantize(model, "int8" | "bf16")` replaces every `nn.Linear` (the head included) by a `QuantizedLinear` that
keeps its weight in int8 with one scale per output channel, or in bf16. Decoding reads every weight once per
token, so it is bound by memory bandwidth: int8 reads 4x fewer bytes than fp32."""

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Quantization = Literal["none", "int8", "bf16"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "bf16")
# PyTorch's CPU int8 kernel reads the input dimension in vectors of 16 and crashes (segfault) on other widths
# (torch 2.13, AVX-512): weights are stored with zero columns up to a multiple of this, inputs padded to match.
INT8_K_MULTIPLE = 16


class QuantizedLinear(nn.Module):
    """An inference-only `nn.Linear`: weight-only int8 (symmetric, per output channel: `w ≈ q * scale[out]`,
    q in [-127, 127]) through PyTorch's `_weight_int8pack_mm`, or bf16 weights through `F.linear`.

    The matmul runs on bf16 activations: the int8 kernel has a vectorised path for bf16 inputs only (fp32
    inputs take a ~10x slower one here), and bf16 weights want bf16 inputs. The result comes back in the
    input's dtype, so everything around the linear layers (norms, the recurrence, the state) keeps its dtype."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        if mode not in ("int8", "bf16"):
            raise ValueError(f"quantization must be int8 or bf16, got {mode!r}")
        self.mode, self.in_features, self.out_features = mode, linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        if mode == "int8":
            # the scale is rounded to bf16 (the kernel's dtype) before the weights are: q * scale is then
            # exactly what the kernel multiplies, and the rounding of the scale costs no accuracy
            scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
            q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            self.register_buffer("weight", F.pad(q, (0, -self.in_features % INT8_K_MULTIPLE)).contiguous())
            self.register_buffer("scale", scale)
        else:
            self.register_buffer("weight", w.to(torch.bfloat16).contiguous())
            self.register_buffer("scale", None)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, [out, in] fp32."""
        if self.mode == "bf16":
            return self.weight.float()
        return self.weight[:, : self.in_features].float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.bfloat16)
        if self.mode == "int8":
            # the kernel wants rows contiguous in memory; inputs may be views (e.g. a projector's transposed conv)
            h = F.pad(h, (0, self.weight.shape[1] - self.in_features)).reshape(-1, self.weight.shape[1]).contiguous()
            y = torch._weight_int8pack_mm(h, self.weight, self.scale).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(h, self.weight)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize(model: nn.Module, mode: Quantization) -> nn.Module:
    """Replaces every `nn.Linear` of `model` (an RWKV7 or a ModRWKV: the head, the time- and channel-mix
    projections, the projectors' adapters, the forecast layers) by a `QuantizedLinear` in `mode` ("int8" or
    "bf16"; "none" changes nothing), in place; returns the model, in eval mode. Inference only: the result
    has no gradients through those layers and refuses `save_pretrained` (save the model before quantizing)."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {mode!r}")
    model.eval()
    if mode == "none":
        return model
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantizedLinear(linear, mode).to(linear.weight.device))
    return model


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the model's `QuantizedLinear` layers (empty for a model that was never quantized)."""
    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def prepare_for_inference(model: nn.Module, dtype: torch.dtype | None = None,
                          quantization: Quantization = "none") -> nn.Module:
    """Eval mode, `dtype` if given, `quantize(model, quantization)`, then the CPU-fastest layout of the linear
    weights left in floating point (in place; returns the model). Call it last: a later `.to(dtype)` keeps each
    weight's memory layout, which may then be the slow one for that dtype, and would cast int8 weights."""
    model.eval()
    if dtype is not None:
        model.to(dtype)
    quantize(model, quantization)
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
