"""RWKV-7 backbone configuration: sizes only, everything else follows from them."""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path


def lora_rank(factor: float, n_embd: int) -> int:
    """RWKV-LM's suggested LoRA width: max(32, round(factor * sqrt(C) / 32) * 32)."""
    return max(32, int(round(factor * math.sqrt(n_embd) / 32) * 32))


@dataclass
class RWKV7Config:
    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    dim_ffn: int = 0  # 0: 4 * n_embd, as in the released checkpoints
    decay_lora: int = 0  # D_w; 0: lora_rank(2.5, C)
    a_lora: int = 0  # D_a; 0: lora_rank(2.5, C)
    v_lora: int = 0  # D_v; 0: lora_rank(1.7, C)
    gate_lora: int = 0  # D_g; 0: lora_rank(5, C)

    def __post_init__(self):
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of head_size={self.head_size}")
        for name in ("vocab_size", "n_layer", "n_embd", "head_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        C = self.n_embd
        self.dim_ffn = self.dim_ffn or 4 * C
        self.decay_lora = self.decay_lora or lora_rank(2.5, C)
        self.a_lora = self.a_lora or lora_rank(2.5, C)
        self.v_lora = self.v_lora or lora_rank(1.7, C)
        self.gate_lora = self.gate_lora or lora_rank(5, C)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return {"model_type": "rwkv7", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RWKV7Config":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"model_type"}
        if unknown:
            raise ValueError(f"unknown RWKV7Config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "RWKV7Config":
        return cls.from_dict(json.loads(Path(path).read_text()))
