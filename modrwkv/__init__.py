"""ModRWKV: a multimodal LLM on the RWKV-7 backbone.

Importing the package loads nothing heavy: the chat format (`modrwkv.conversation`: turns, the template, sample
records; `modrwkv.tokenizer`) needs no torch and is read by data jobs that have none. The model classes below load
torch when first named."""

import importlib

_EXPORTS = {"RWKV7": ".model", "RWKV7State": ".model", "RWKV7Config": ".config", "quantize": ".inference"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
