"""Fracast-0's context encoder in plain torch (the wheel's Apache-2.0 `FracastCore`, re-implemented).

One shared dilated causal block runs at dilations 1, 2, 4, ... 512, each pass FiLM-conditioned on the
dilation; the input projection sees the value, its coverage and 5 recency channels, plus a projected
sin/cos phase of the window's significant periods (a parameter-free periodogram detector). Output:
[B, W, D] per-step features, the input of the package's forecast head. Parameter names match the
release's `core.*` tensors so its safetensors load strictly.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from modrwkv.checkpoint import write_safetensors

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class FracastConfig:
    d_model: int = 64
    context: int = 2048  # W: every window is left-padded to this length
    stages: int = 10
    dilation_base: int = 2
    kernel: int = 3
    ffn_mult: float = 1.5
    scale_features: int = 8  # sin/cos features of log2(dilation) for FiLM
    periods: int = 4  # top-k significant periods encoded as phase
    min_period: int = 2
    period_alpha: float = 0.05  # significance level of the periodogram peaks
    model_type: str = "fracast"

    @property
    def dilations(self) -> list[int]:
        return [self.dilation_base**i for i in range(self.stages)]


def recency_features(length: int) -> torch.Tensor:
    """[length, 5]: signed distance from the last step (linear, log) and three exponential decays of it."""
    delta = (torch.arange(length, dtype=torch.float32) - (length - 1)) / length
    dist = delta.abs()
    return torch.stack([delta, torch.sign(delta) * torch.log1p(dist) / math.log(2.0),
                        torch.exp(-0.5 * dist), torch.exp(-2.0 * dist), torch.exp(-8.0 * dist)], dim=-1)


def significant_periods(x: torch.Tensor, top_k: int, min_period: int, alpha: float) -> torch.Tensor:
    """[B, top_k] integer periods of the strongest periodogram peaks passing a Bonferroni test; 0 = none."""
    width = x.shape[1]
    n_fft = 1 << math.ceil(math.log2(max(2, width)))
    x = x.float()  # the periodogram in fp32 whatever the model's dtype (torch's CPU FFT takes no fp16/bf16)
    spectrum = torch.fft.rfft(x - x.mean(dim=1, keepdim=True), n=n_fft)
    power = spectrum.abs().square()[:, 1:]  # drop DC; index j is frequency bin j + 1
    n_bins = power.shape[1]
    share = power / power.sum(dim=1, keepdim=True).clamp(min=1e-12)
    # candidate bins: periods between min_period and half the window
    lo = max(0, n_fft // max(2, width // 2) - 1)
    hi = min(n_bins - 1, max(0, n_fft // max(2, min_period) - 1))
    in_range = torch.zeros(n_bins, dtype=torch.bool, device=x.device)
    in_range[lo : hi + 1] = hi > lo
    local_max = F.pad((share[:, 1:-1] > share[:, :-2]) & (share[:, 1:-1] > share[:, 2:]), (1, 1), value=False)
    threshold = math.log(max(2, n_bins) / min(max(alpha, 1e-12), 1.0)) / max(2, n_bins)
    score = torch.where(local_max & in_range & (share >= threshold), share, float("-inf"))
    best, bins = score.topk(min(top_k, n_bins), dim=1)
    periods = torch.round(n_fft / (bins + 1).float()).long()
    return torch.where(torch.isfinite(best), periods, 0)


def phase_features(periods: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length, 2K]: (sin, cos) of each position's phase within each period; zeros for rejected slots."""
    t = torch.arange(length, dtype=torch.float32, device=periods.device)[None, :, None]
    angle = 2 * math.pi * t / periods.clamp(min=1)[:, None, :].float()
    valid = (periods > 0)[:, None, :].float()
    return torch.stack([torch.sin(angle) * valid, torch.cos(angle) * valid], dim=-1).flatten(2)


class PeriodicPhase(nn.Module):
    def __init__(self, config: FracastConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(2 * config.periods, config.d_model)

    def forward(self, values: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        # unobserved steps take the mean of the observed ones so padding adds no spurious period
        mean = (values * observed).sum(1, keepdim=True) / observed.sum(1, keepdim=True).clamp(min=1)
        filled = torch.where(observed, values, mean)
        c = self.config
        periods = significant_periods(filled, c.periods, c.min_period, c.period_alpha)
        return self.proj(phase_features(periods, values.shape[1]).to(self.proj.weight.dtype))


class ScaleFiLM(nn.Module):
    """x * (1 + gamma) + beta, with gamma, beta a linear map of sin/cos features of log2(dilation)."""

    def __init__(self, d_model: int, features: int):
        super().__init__()
        self.freqs = features // 2
        self.to_gb = nn.Linear(2 * self.freqs, 2 * d_model)

    def forward(self, x: torch.Tensor, dilation: int) -> torch.Tensor:
        angle = math.log2(dilation) / 2.0 ** torch.arange(self.freqs, dtype=torch.float32, device=x.device) * math.pi
        gamma, beta = self.to_gb(torch.cat([torch.sin(angle), torch.cos(angle)]).to(x.dtype)).chunk(2, dim=-1)
        return x * (1 + gamma) + beta


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class DilatedBlock(nn.Module):
    """Causal depthwise conv (dilation given per call) + pointwise linear, then SwiGLU; post-RMSNorm residuals."""

    def __init__(self, d_model: int, kernel: int, ffn_mult: float):
        super().__init__()
        self.kernel = kernel
        self.dw_weight = nn.Parameter(torch.zeros(d_model, 1, kernel))
        self.dw_bias = nn.Parameter(torch.zeros(d_model))
        self.pw = nn.Linear(d_model, d_model)
        self.ffn = SwiGLU(d_model, int(d_model * ffn_mult))
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)

    def forward(self, x: torch.Tensor, dilation: int) -> torch.Tensor:
        padded = F.pad(x.transpose(1, 2), ((self.kernel - 1) * dilation, 0))
        conv = F.conv1d(padded, self.dw_weight, self.dw_bias, dilation=dilation, groups=x.shape[-1])
        x = self.norm1(x + self.pw(conv.transpose(1, 2)))
        return self.norm2(x + self.ffn(x))


class FracastNet(nn.Module):
    def __init__(self, config: FracastConfig):
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(2 + 5, config.d_model)  # value, coverage, 5 recency channels
        self.periodic = PeriodicPhase(config)
        self.block = DilatedBlock(config.d_model, config.kernel, config.ffn_mult)
        self.scale = ScaleFiLM(config.d_model, config.scale_features)
        self.norm = nn.RMSNorm(config.d_model)
        self.register_buffer("recency", recency_features(config.context), persistent=False)

    def forward(self, values: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """values, observed: [B, W] (W = config.context) -> [B, W, d_model]."""
        values = torch.where(observed, values, 0.0)
        inputs = torch.cat([values[..., None], observed[..., None].to(values.dtype),
                            self.recency.expand(values.shape[0], -1, -1).to(values.dtype)], dim=-1)
        x = self.in_proj(inputs) + self.periodic(values, observed)
        for dilation in self.config.dilations:
            x = self.block(self.scale(x, dilation), dilation)
        return self.norm(x)


def save_fracast(model: FracastNet, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    return out


def read_fracast_config(model_dir) -> FracastConfig:
    path = Path(model_dir)
    fields = json.loads((path / CONFIG_FILE).read_text())
    if fields.get("model_type") != "fracast":
        raise ValueError(f"{path}: config.json is a {fields.get('model_type')!r} model, not fracast")
    return FracastConfig(**fields)


def load_fracast(model_dir) -> FracastNet:
    path = Path(model_dir)
    model = FracastNet(read_fracast_config(path))
    model.load_state_dict(load_file(path / WEIGHTS_FILE), strict=True)
    return model
