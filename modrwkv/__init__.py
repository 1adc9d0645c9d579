"""ModRWKV: a multimodal LLM on the RWKV-7 backbone."""

from .config import RWKV7Config
from .inference import quantize
from .model import RWKV7, RWKV7State

__all__ = ["RWKV7", "RWKV7Config", "RWKV7State", "quantize"]
