"""WaveNet: the trainable time-series encoder (dilated causal convolutions, gated residual blocks).

Unlike the frozen encoders it trains together with the adapter, so the feature cache stores its input (the
normalised series) and the model runs it. Series are normalised per window; the forecast is mapped back.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class WaveNetConfig:
    in_channels: int = 1
    hidden: int = 64
    layers: int = 6  # dilations 1, 2, 4, ... 2^(layers-1)
    kernel: int = 2

    def __post_init__(self):  # at load: else a Ray Train worker fails on it, after retries, naming no setting
        for name in ("in_channels", "hidden", "layers", "kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, not {getattr(self, name)}")

    @property
    def receptive_field(self) -> int:
        return (self.kernel - 1) * (2**self.layers - 1) + 1


class CausalBlock(nn.Module):
    def __init__(self, hidden: int, kernel: int, dilation: int, last: bool):
        super().__init__()
        self.left_pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(hidden, 2 * hidden, kernel, dilation=dilation)
        # the last block feeds only the skip sum, so it has no residual output
        self.residual = None if last else nn.Conv1d(hidden, hidden, 1)
        self.skip = nn.Conv1d(hidden, hidden, 1)

    def forward(self, x):
        filt, gate = self.conv(F.pad(x, (self.left_pad, 0))).chunk(2, dim=1)
        h = torch.tanh(filt) * torch.sigmoid(gate)
        return (x if self.residual is None else x + self.residual(h)), self.skip(h)


class WaveNet(nn.Module):
    def __init__(self, config: WaveNetConfig):
        super().__init__()
        self.config = config
        self.input = nn.Conv1d(config.in_channels, config.hidden, 1)
        self.blocks = nn.ModuleList(
            CausalBlock(config.hidden, config.kernel, 2**i, last=i == config.layers - 1) for i in range(config.layers)
        )
        self.output = nn.Conv1d(config.hidden, config.hidden, 1)

    @property
    def output_dim(self) -> int:
        return self.config.hidden

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        """[L, channels] or [B, L, channels] -> same leading dims, hidden features; position t sees only <= t."""
        squeeze = series.dim() == 2
        x = self.input((series[None] if squeeze else series).transpose(1, 2))
        skips = 0
        for block in self.blocks:
            x, skip = block(x)
            skips = skips + skip
        out = self.output(F.relu(skips)).transpose(1, 2)
        return out[0] if squeeze else out


STD_FLOOR = 1e-5  # a flat window's std: its normalised values are 0, and anything it is scaled by is x 1e5


def normalize_series(window: torch.Tensor, sample_id: str = "?", eps: float = STD_FLOOR):
    """Per-window, per-channel z-score in the window's own dtype: returns (normalised, mean, std). NaN/inf are
    refused."""
    if not torch.isfinite(window).all():
        raise ValueError(f"sample {sample_id}: the series has NaN or inf values")
    if window.shape[0] < 2:
        raise ValueError(f"sample {sample_id}: a series window needs at least 2 points, got {window.shape[0]}")
    mean = window.mean(dim=0, keepdim=True)
    std = window.std(dim=0, keepdim=True).clamp(min=eps)
    if not torch.isfinite(std).all():
        raise ValueError(f"sample {sample_id}: the series' values are too large to normalise (their spread overflows)")
    return (window - mean) / std, mean, std


def denormalize_series(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return values * std + mean
