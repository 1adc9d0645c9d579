"""Timer (thuml, "timer-base-84m" architecture): a decoder-only transformer over 96-step patches.

Transformers ships no Timer class, so this is a small faithful one: a bias-free linear patch embedding,
post-LayerNorm decoder layers (causal multi-head attention with rotary positions over patch indices, q/k/v
biased and the output projection not; a bias-free SiLU-gated MLP) and a final LayerNorm. Parameter names
and config keys follow thuml's checkpoint (base_model_prefix "model"), so its directory should load too.
Output: one feature vector per patch; patch i sees patches <= i only.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN


class TimerConfig(PreTrainedConfig):
    model_type = "timer"

    def __init__(self, input_token_len=96, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=8, hidden_act="silu", rope_theta=10000.0, initializer_range=0.02, **kwargs):
        self.input_token_len = input_token_len
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding over the sequence axis of [B, heads, N, head_dim] (half-split pairing)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angle = torch.arange(x.shape[-2], dtype=torch.float32, device=x.device)[:, None] * inv_freq
    cos, sin = torch.cat([angle, angle], -1).cos().to(x.dtype), torch.cat([angle, angle], -1).sin().to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class TimerPatchEmbedding(nn.Module):
    def __init__(self, config: TimerConfig):
        super().__init__()
        self.patch = config.input_token_len
        self.emb = nn.Linear(config.input_token_len, config.hidden_size, bias=False)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        return self.emb(series.unfold(-1, self.patch, self.patch))


class TimerAttention(nn.Module):
    def __init__(self, config: TimerConfig):
        super().__init__()
        self.heads, self.theta = config.num_attention_heads, config.rope_theta
        size = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(size, size) for _ in range(3))
        self.o_proj = nn.Linear(size, size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, size = x.shape

        def heads(t):
            return t.view(b, n, self.heads, size // self.heads).transpose(1, 2)

        q, k = rotary(heads(self.q_proj(x)), self.theta), rotary(heads(self.k_proj(x)), self.theta)
        out = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, size))


class TimerMLP(nn.Module):
    def __init__(self, config: TimerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TimerDecoderLayer(nn.Module):
    def __init__(self, config: TimerConfig):
        super().__init__()
        self.self_attn = TimerAttention(config)
        self.ffn_layer = TimerMLP(config)
        self.norm1, self.norm2 = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)

    def forward(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.ffn_layer(x))


class TimerModel(PreTrainedModel):
    config_class = TimerConfig
    base_model_prefix = "model"

    def __init__(self, config: TimerConfig):
        super().__init__(config)
        self.embed_layer = TimerPatchEmbedding(config)
        self.layers = nn.ModuleList(TimerDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        """[B, N * input_token_len] -> [B, N, hidden_size]."""
        x = self.embed_layer(series)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
