"""From encoder features to backbone embeddings: optional Conv1D sequence compression, then the MLP adapter.

    features [L, enc] --Conv1D(k, s), no padding--> [L', enc], L' = floor((L - k) / s) + 1
                      --Linear(enc, m*C) -> ReLU -> Linear(m*C, C)--> [L', C]
(k, s) = (0, 0) means no compression. The paper's Table 7: 577 tokens -> 288 / 192 / 144 for (3,2) / (4,3) / (5,4).
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


@dataclass
class ProjectorConfig:
    encoder_dim: int
    model_dim: int
    kernel: int = 0  # Conv1D compression kernel; 0 with stride 0 = no compression
    stride: int = 0
    adapter_scale: int = 4  # m: the adapter's hidden width is m * model_dim

    def __post_init__(self):
        if (self.kernel == 0) != (self.stride == 0) or self.kernel < 0 or self.stride < 0:
            raise ValueError(f"compression (kernel, stride) must be (0, 0) or both positive, got ({self.kernel}, {self.stride})")
        if self.encoder_dim <= 0 or self.model_dim <= 0 or self.adapter_scale <= 0:
            raise ValueError(f"encoder_dim, model_dim and adapter_scale must be positive: {asdict(self)}")

    def compressed_length(self, length: int) -> int:
        if self.kernel == 0:
            return length
        if length < self.kernel:
            return 0
        return (length - self.kernel) // self.stride + 1


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        c = config
        self.compress = nn.Conv1d(c.encoder_dim, c.encoder_dim, c.kernel, c.stride) if c.kernel else None
        self.adapter = nn.Sequential(
            nn.Linear(c.encoder_dim, c.adapter_scale * c.model_dim),
            nn.ReLU(),
            nn.Linear(c.adapter_scale * c.model_dim, c.model_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[L, enc] or [B, L, enc] -> [L', C] or [B, L', C]."""
        squeeze = features.dim() == 2
        x = features[None] if squeeze else features
        if x.shape[-1] != self.config.encoder_dim:
            raise ValueError(f"features have width {x.shape[-1]}, the projector expects {self.config.encoder_dim}")
        if self.compress is not None:
            if x.shape[1] < self.config.kernel:
                raise ValueError(f"{x.shape[1]} feature vectors are fewer than the compression kernel {self.config.kernel}")
            x = self.compress(x.transpose(1, 2)).transpose(1, 2)
        x = self.adapter(x)
        return x[0] if squeeze else x
