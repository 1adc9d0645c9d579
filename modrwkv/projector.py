"""From encoder features to backbone embeddings: optional normalisation with the training features' statistics,
optional Conv1D sequence compression, then the MLP adapter.

    features [L, enc] --normalize--> --Conv1D(k, s), no padding--> [L', enc], L' = floor((L - k) / s) + 1
                      --Linear(enc, m*C) -> ReLU -> Linear(m*C, C)--> [L', C]
(k, s) = (0, 0) means no compression. The paper's Table 7: 577 tokens -> 288 / 192 / 144 for (3,2) / (4,3) / (5,4).

`normalize`: "standardize" is (x - mean) / std per dimension; "whiten" is (x - mean) W with W = Σ^(-1/2), the ZCA
whitening matrix of the training features (`set_feature_stats`; saved with the weights). A frozen encoder's
informative directions can have a small spread (DINOv2 is trained to ignore colour jitter, so colour lies in
low-variance directions that are not axis-aligned); the adapter learns them far faster once every direction has
unit variance (measured in benchmarks/RESULTS.md, issue 12).
"""

from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn as nn

Normalize = Literal["none", "standardize", "whiten"]
# Each modality's measured best (benchmarks/RESULTS.md, issue 12): whitening lifts DINOv2's colour (0.46 -> 0.86)
# but doubles the spoken-digit errors on Whisper features (WER 0.05 -> 0.22); series are the same either way.
DEFAULT_NORMALIZE: dict[str, Normalize] = {"image": "whiten", "audio": "standardize", "series": "standardize"}


@dataclass
class ProjectorConfig:
    encoder_dim: int = 0  # 0: not known yet (the trainer reads it from the feature caches)
    model_dim: int = 0  # 0: the backbone's width (ModRWKVConfig fills it in)
    kernel: int = 0  # Conv1D compression kernel; 0 with stride 0 = no compression
    stride: int = 0
    adapter_scale: int = 4  # m: the adapter's hidden width is m * model_dim
    # with the training features' statistics: per dimension, or ZCA whitening; None: the modality's
    # DEFAULT_NORMALIZE in a ModRWKV (ModRWKVConfig fills it in), none for a projector on its own
    normalize: Normalize | None = None

    def __post_init__(self):
        if (self.kernel == 0) != (self.stride == 0) or self.kernel < 0 or self.stride < 0:
            raise ValueError(f"compression (kernel, stride) must be (0, 0) or both positive, got ({self.kernel}, {self.stride})")
        if self.encoder_dim < 0 or self.model_dim < 0 or self.adapter_scale <= 0:
            raise ValueError(f"encoder_dim and model_dim must be positive (0: filled in later), adapter_scale "
                             f"positive: {asdict(self)}")
        if self.normalize is not None and self.normalize not in get_args(Normalize):
            raise ValueError(f"normalize must be none, standardize or whiten, not {self.normalize!r}")

    def compressed_length(self, length: int) -> int:
        if self.kernel == 0:
            return length
        if length < self.kernel:
            return 0
        return (length - self.kernel) // self.stride + 1


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        if not (config.encoder_dim and config.model_dim):
            raise ValueError(f"a projector needs encoder_dim and model_dim (ModRWKVConfig fills in model_dim): {config}")
        self.config = config = replace(config, normalize=config.normalize or "none")  # alone: no default to apply
        c = config
        if c.normalize != "none":  # identity until set_feature_stats
            self.register_buffer("feature_mean", torch.zeros(c.encoder_dim))
        if c.normalize == "standardize":
            self.register_buffer("feature_std", torch.ones(c.encoder_dim))
        if c.normalize == "whiten":
            self.register_buffer("feature_whitening", torch.eye(c.encoder_dim))
        self.compress = nn.Conv1d(c.encoder_dim, c.encoder_dim, c.kernel, c.stride) if c.kernel else None
        self.adapter = nn.Sequential(
            nn.Linear(c.encoder_dim, c.adapter_scale * c.model_dim),
            nn.ReLU(),
            nn.Linear(c.adapter_scale * c.model_dim, c.model_dim),
        )

    @torch.no_grad()
    def set_feature_stats(self, mean, std=None, whitening=None) -> None:
        """The training features' mean, and their per-dimension std ("standardize") or whitening matrix ("whiten")."""
        d, kind = self.config.encoder_dim, self.config.normalize
        if kind == "none":
            raise ValueError("this projector does not normalise its features (ProjectorConfig.normalize)")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if mean.shape != (d,):
            raise ValueError(f"the feature mean must be a [{d}] vector, not {tuple(mean.shape)}")
        if kind == "standardize":
            std = torch.as_tensor(std, dtype=torch.float32)
            if std.shape != (d,) or not (std > 0).all():
                raise ValueError(f"the feature std must be a [{d}] vector, every entry > 0")
            self.feature_std.copy_(std)
        else:
            whitening = torch.as_tensor(whitening, dtype=torch.float32)
            if whitening.shape != (d, d) or not torch.isfinite(whitening).all():
                raise ValueError(f"the whitening matrix must be a finite [{d}, {d}] matrix")
            self.feature_whitening.copy_(whitening)
        self.feature_mean.copy_(mean)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[L, enc] or [B, L, enc] -> [L', C] or [B, L', C]."""
        squeeze = features.dim() == 2
        x = features[None] if squeeze else features
        if x.shape[-1] != self.config.encoder_dim:
            raise ValueError(f"features have width {x.shape[-1]}, the projector expects {self.config.encoder_dim}")
        if self.config.normalize == "standardize":
            x = (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)
        elif self.config.normalize == "whiten":
            x = (x - self.feature_mean.to(x.dtype)) @ self.feature_whitening.to(x.dtype)
        if self.compress is not None:
            if x.shape[1] < self.config.kernel:
                raise ValueError(f"{x.shape[1]} feature vectors are fewer than the compression kernel {self.config.kernel}")
            x = self.compress(x.transpose(1, 2)).transpose(1, 2)
        x = self.adapter(x)
        return x[0] if squeeze else x
