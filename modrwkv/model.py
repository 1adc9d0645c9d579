"""The RWKV-7 ("x070") backbone: one readable file, parameter names = RWKV-LM checkpoint keys = paper symbols.

    x = ln0(emb(ids));  per layer:  x += att(ln1(x));  x += ffn(ln2(x));   logits = head(ln_out(x))

The time mix's recurrence goes through `modrwkv_kernels.wkv7`; everything else is plain PyTorch. One forward serves
training (parallel over [B, T], right-padding mask), prefill and decoding (state in, state out).

Packed input: one row [1, T] of S sequences laid end to end, `cu_seqlens` [S + 1] their offsets. Only two
paths cross tokens, the token shift and the wkv recurrence, and both restart at every offset from that
sequence's own state (zeros, or its row of an S-row state); everything else (LayerNorms, LoRAs, the value
residual, ln_x, the bonus) acts on each token alone. So a packed row computes exactly what S separate runs do.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import modrwkv_kernels
from modrwkv_kernels import PackedLayout, on_host, to_device_nowait

from .checkpoint import (UNUSED_LAYER0, WEIGHTS_FILE, cpu_state_dict, infer_config, load_state_strict,
                         read_pretrained, read_rwkv_pth, write_pretrained)
from .config import RWKV7Config


@dataclass
class RWKV7State:
    """Everything the model remembers of a sequence; its size never grows with the sequence's length.

    att_shift, ffn_shift: [L, B, C] the last token's ln1 / ln2 output per layer (token shift);
    wkv: [L, B, H, N, N] the time-mix state (value dim x key dim), always fp32.
    """

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    def clone(self) -> "RWKV7State":
        return RWKV7State(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())

    def select(self, index) -> "RWKV7State":
        """The states of the given batch rows (a list/tensor of indices; repeats allowed, e.g. to fan out)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.wkv.device)
        return RWKV7State(self.att_shift[:, index], self.wkv[:, index], self.ffn_shift[:, index])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.att_shift, self.wkv, self.ffn_shift))


def token_shift(x: torch.Tensor, previous: torch.Tensor, packed: PackedLayout | None = None) -> torch.Tensor:
    """x[:, t-1] for every t, with `previous` ([B, C]) standing before the first token. A packed row ([1, T, C])
    has one `previous` per sequence ([S, C]), standing before that sequence's first token instead of x[:, t-1]."""
    first = previous[:, None].to(x.dtype)
    if packed is not None:
        shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return shifted[0].index_put((packed.cu_seqlens[:-1],), first[:, 0])[None]
    return first if x.shape[1] == 1 else torch.cat([first, x[:, :-1]], dim=1)


def last_valid(x: torch.Tensor, lengths: torch.Tensor | None, previous: torch.Tensor | None,
               packed: PackedLayout | None = None) -> torch.Tensor:
    """x at each row's last real position ([B, C]), or at each packed sequence's last position ([S, C]);
    rows with no real token keep `previous`."""
    if packed is not None:
        return x[0, packed.cu_seqlens[1:] - 1]
    if lengths is None:
        return x[:, -1]
    rows = torch.arange(x.shape[0], device=x.device)
    picked = x[rows, (lengths - 1).clamp(min=0)]
    keep = previous.to(x.dtype) if previous is not None else torch.zeros_like(picked)
    return torch.where((lengths > 0)[:, None], picked, keep)


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.w1, self.w2 = nn.Parameter(torch.zeros(C, cfg.decay_lora)), nn.Parameter(torch.zeros(cfg.decay_lora, C))
        self.a1, self.a2 = nn.Parameter(torch.zeros(C, cfg.a_lora)), nn.Parameter(torch.zeros(cfg.a_lora, C))
        self.v1, self.v2 = nn.Parameter(torch.zeros(C, cfg.v_lora)), nn.Parameter(torch.zeros(cfg.v_lora, C))
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, cfg.gate_lora)), nn.Parameter(torch.zeros(cfg.gate_lora, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x, shift, wkv_state, v_first, pad, packed):
        """x: [B, T, C] (ln1 output); pad: [B, T] bool (True = padding) or None; packed: a packed row's
        `PackedLayout` or None."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, shift, packed) - x
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, xx, m)
                                  for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # decay exp(-exp(w)) in (0.545, 1)
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:  # value residual towards layer 0's v
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)

        wkv_in = [r, w, k, v, -kk, kk * a]
        if pad is not None:  # padded steps leave the state untouched: decay 1, no writes
            keep = (~pad)[..., None]
            wkv_in = [t * keep for t in wkv_in]
            wkv_in[1] = w.masked_fill(~keep, float("-inf"))
        y, wkv_state = modrwkv_kernels.wkv7(*(t.view(B, T, H, N) for t in wkv_in), initial_state=wkv_state,
                                            cu_seqlens=packed)

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        y = y + ((r * k).view(B, T, H, N) * self.r_k).sum(dim=-1, keepdim=True).mul(v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), wkv_state, v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x, shift, packed):
        k = torch.addcmul(x, token_shift(x, shift, packed) - x, self.x_k)
        return self.value(torch.relu(self.key(k)) ** 2)


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, att_shift, wkv_state, ffn_shift, pad, lengths, packed):
        if self.layer_id == 0:
            x = self.ln0(x)
        xa = self.ln1(x)
        out, wkv_state, v_first = self.att(xa, att_shift, wkv_state, v_first, pad, packed)
        x = x + out
        xf = self.ln2(x)
        x = x + self.ffn(xf, ffn_shift, packed)
        return (x, v_first, last_valid(xa, lengths, att_shift, packed), wkv_state,
                last_valid(xf, lengths, ffn_shift, packed))


class RWKV7(nn.Module):
    def __init__(self, config: RWKV7Config):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # Inference (no grad) runs long inputs in segments of this many tokens with the state carried:
        # same result, bounded activation memory.
        self.prefill_segment = 2048

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None) -> "RWKV7":
        """A save_pretrained directory, or an RWKV-LM `.pth` file (sizes inferred from the shapes). Strict: every
        missing, unexpected or mis-shaped key is named in one CheckpointError. dtype default: the directory's
        saved dtype; fp32 for a `.pth`."""
        path = Path(path)
        if path.is_dir():
            config, weights = read_pretrained(path)
            source, optional = path / WEIGHTS_FILE, ()
            # the saved dtype; a file without emb.weight is named by the strict load below
            dtype = dtype or getattr(weights.get("emb.weight"), "dtype", None)
        else:
            weights = read_rwkv_pth(path)
            config, source, optional = infer_config(weights, path), path, UNUSED_LAYER0
        model = cls(config)
        load_state_strict(model, weights, source, optional=optional)
        return model.to(dtype or torch.float32).eval()

    def save_pretrained(self, directory) -> None:
        write_pretrained(self.config, cpu_state_dict(self), directory)

    @torch.no_grad()
    def init_weights(self) -> "RWKV7":
        """RWKV-LM's initialisation for training from scratch (a plain PyTorch init diverges)."""
        cfg = self.config
        L, C, N = cfg.n_layer, cfg.n_embd, cfg.head_size
        channel = torch.arange(C, dtype=torch.float64)
        ddd = (channel / C).view(1, 1, C)
        linear = channel / (C - 1) - 0.5
        zigzag = ((channel % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()

        def lora_orthogonal(t: torch.Tensor, gain: float) -> None:
            # RWKV-LM's ortho_init for the second LoRA factors: tall matrices get an extra sqrt(rows / cols)
            rows, cols = t.shape
            nn.init.orthogonal_(t, gain=gain * (math.sqrt(rows / cols) if rows > cols else 1.0))

        for layer_id, block in enumerate(self.blocks):
            ratio_0_to_1 = layer_id / max(L - 1, 1)
            ratio_1_to_almost0 = 1.0 - layer_id / L
            att, ffn = block.att, block.ffn
            for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(att, name).copy_(1.0 - ddd ** (power * ratio_1_to_almost0))
            decay_speed = -6 + 6 * (channel / (C - 1)) ** (1 + ratio_0_to_1**0.3)
            att.w0.copy_((decay_speed + 0.5 + 2.5 * zigzag).view(1, 1, C))
            att.a0.copy_((-0.19 + 0.3 * zigzag + 0.4 * linear).view(1, 1, C))
            att.v0.copy_((0.73 - 0.4 * linear).view(1, 1, C))
            att.k_k.copy_((0.71 - 0.1 * linear).view(1, 1, C))
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            for first, second in ((att.w1, att.w2), (att.a1, att.a2), (att.v1, att.v2), (att.g1, att.g2)):
                first.zero_()
                lora_orthogonal(second, 0.1)
            nn.init.orthogonal_(att.receptance.weight, gain=1.0)
            nn.init.orthogonal_(att.key.weight, gain=0.1)
            nn.init.orthogonal_(att.value.weight, gain=1.0)
            att.output.weight.zero_()
            att.ln_x.weight.fill_(((layer_id + 1) / L) ** 0.7)
            att.ln_x.bias.zero_()
            ffn.x_k.copy_(1.0 - ddd ** (ratio_1_to_almost0**4))
            nn.init.orthogonal_(ffn.key.weight, gain=1.0)
            ffn.value.weight.zero_()
            for ln in (block.ln1, block.ln2) + ((block.ln0,) if layer_id == 0 else ()):
                ln.reset_parameters()
        self.ln_out.reset_parameters()
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        V = cfg.vocab_size
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        return self

    def unread_parameters(self) -> list[nn.Parameter]:
        """The parameters no forward pass reads: layer 0's value-residual mix (v0, v1, v2; layer 0's v is the one
        the others mix towards), kept for RWKV-LM's checkpoint layout."""
        att = self.blocks[0].att
        return [att.v0, att.v1, att.v2]

    def optimizer_groups(self, weight_decay: float = 0.0, params: dict | None = None) -> list[dict]:
        """RWKV-LM's parameter groups: att.w0 at 2x lr; weight decay only on large matrices.

        Each group carries `lr_scale` (multiply the base lr by it), the decayed one `decays` (a trainer resuming an
        optimizer's state sets its decay anew, the state's holding the old one). `params` (name -> parameter)
        restricts the groups to those, e.g. only trainable ones; default: every parameter of the model.
        """
        params = dict(self.named_parameters()) if params is None else params
        double, decay, plain = [], [], []
        for name, p in params.items():
            if name.endswith("att.w0"):
                double.append(p)
            elif weight_decay > 0 and p.squeeze().dim() >= 2 and name.endswith(".weight"):
                decay.append(p)
            else:
                plain.append(p)
        groups = [
            {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": double, "weight_decay": 0.0, "lr_scale": 2.0},
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "decays": True},
        ]
        return [g for g in groups if g["params"]]

    # ---- state --------------------------------------------------------------------------------------------
    def zero_state(self, batch_size: int, device=None, dtype=None) -> RWKV7State:
        cfg = self.config
        device = device or self.emb.weight.device
        dtype = dtype or self.emb.weight.dtype
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return RWKV7State(
            att_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch_size, H, N, N, device=device, dtype=torch.float32),
            ffn_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
        )

    # ---- forward ------------------------------------------------------------------------------------------
    def check_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ids on the host (read back once if given on the device), checked: [B, T], inside the vocabulary."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        host = on_host(input_ids)
        ids = host.numpy()
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): "
                             f"found {np.unique(bad)[:8].tolist()}")
        return host

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        state: RWKV7State | None = None,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RWKV7State]:
        """Returns (logits, state): logits [B, T, V] (or [B, n, V] for logits_to_keep=n), and the state after
        the last real token of each row, which continues the sequence exactly.

        attention_mask: [B, T], 1 for real tokens, 0 for right padding. inputs_embeds ([B, T, C]) replaces
        the embedding lookup (the multimodal model splices encoder features in there). cu_seqlens: [S + 1]
        offsets of S sequences packed into one row [1, T] (or their `PackedLayout`); `state` then holds S
        sequences, in and out.
        """
        x, state, pad, lengths, packed = self._prepare(input_ids, inputs_embeds, state, attention_mask, cu_seqlens)
        if logits_to_keep and (pad is not None or packed is not None):
            raise ValueError("logits_to_keep counts back from a row's last position: padding in a padded batch's "
                             "shorter rows, the last sequence's in a packed row; take every position's logits, or "
                             "forward_hidden and pick each sequence's last real position")
        T = x.shape[1]
        segment = self.prefill_segment
        if torch.is_grad_enabled() or T <= segment or pad is not None or packed is not None:
            hidden, state = self._body(x, state, pad, lengths, packed)
            return self._logits(hidden, logits_to_keep), state
        kept = []
        keep = logits_to_keep or T
        for start in range(0, T, segment):
            hidden, state = self._body(x[:, start : start + segment], state, None, None, None)
            n = min(keep - (T - start - hidden.shape[1]), hidden.shape[1])
            if n > 0:
                kept.append(self._logits(hidden, n))
        return torch.cat(kept, dim=1), state

    def forward_hidden(self, input_ids=None, state=None, attention_mask=None, inputs_embeds=None, cu_seqlens=None):
        """The body without the head: (hidden states after ln_out [B, T, C], state). For heads of one's own."""
        x, state, pad, lengths, packed = self._prepare(input_ids, inputs_embeds, state, attention_mask, cu_seqlens)
        hidden, state = self._body(x, state, pad, lengths, packed)
        return self.ln_out(hidden), state

    def _prepare(self, input_ids, inputs_embeds, state, attention_mask, cu_seqlens):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self.check_input_ids(input_ids)
            x = self.emb(to_device_nowait(input_ids, self.emb.weight.device))
        else:
            x = inputs_embeds.to(self.emb.weight.dtype)
        B, T, _ = x.shape
        pad, lengths = self._padding(attention_mask, B, T, x.device)
        packed = None
        if cu_seqlens is not None:
            if B != 1 or attention_mask is not None:
                raise ValueError(f"packed input (cu_seqlens) is one row without padding: got {B} rows"
                                 + (" and an attention_mask" if attention_mask is not None else ""))
            # the offsets are read once here (or by the caller): no layer syncs with the device for them
            packed = modrwkv_kernels.as_layout(cu_seqlens, T, x.device)
            B = packed.n_segments  # one state per packed sequence
        if state is None:
            state = self.zero_state(B, x.device, x.dtype)
        elif state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} sequences but the input has {B}")
        return x, state, pad, lengths, packed

    def _padding(self, attention_mask, B, T, device):
        if attention_mask is None:
            return None, None
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
        mask = on_host(attention_mask).numpy().astype(bool)
        lengths = mask.sum(axis=1)
        if not np.array_equal(mask, np.arange(T)[None, :] < lengths[:, None]):
            raise ValueError("attention_mask must be right-padded: ones, then zeros, in every row")
        if mask.all():
            return None, None
        return to_device_nowait(torch.from_numpy(~mask), device), to_device_nowait(torch.from_numpy(lengths), device)

    def _body(self, x, state, pad, lengths, packed):
        v_first = None
        att_shifts, wkvs, ffn_shifts = [], [], []
        for i, block in enumerate(self.blocks):
            args = (x, v_first, state.att_shift[i], state.wkv[i], state.ffn_shift[i], pad, lengths, packed)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, v_first, att_shift, wkv, ffn_shift = checkpoint(block, *args, use_reentrant=False)
            else:
                x, v_first, att_shift, wkv, ffn_shift = block(*args)
            att_shifts.append(att_shift)
            wkvs.append(wkv)
            ffn_shifts.append(ffn_shift)
        new_state = RWKV7State(torch.stack(att_shifts), torch.stack(wkvs).float(), torch.stack(ffn_shifts))
        return x, new_state

    def _logits(self, hidden, logits_to_keep):
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.head(self.ln_out(hidden))
