"""ModRWKV for `transformers` (trust_remote_code), written by `modrwkv export --to hf`: a multimodal LLM whose
backbone is the RWKV-7 ("x070") linear-time RNN. Pure PyTorch, a plain reference recurrence (no custom kernels):
made to be read and to reproduce the trained model's logits, not for speed.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer("User: <image>\\nWhat digit is this?\\n\\nAssistant:", return_tensors="pt").input_ids
    # a turn's text holds no blank line (training wrote "\n\n" only to end a turn: runs of newlines made one "\n")
    # one <image> placeholder stands for as many positions as the projector makes of the features (see
    # `expand_placeholders`); features: [L, encoder_dim] from the encoder the config's `encoders` names
    ids = model.expand_placeholders(ids, image_features=[features])
    logits = model(ids, image_features=[features]).logits

Parameter names are RWKV-LM's, after the paper's symbols, so the weights are the ModRWKV checkpoint's as they are:

    x = ln0(emb(ids)), modality features spliced in at their placeholder positions
    per layer:  x = x + TimeMix(ln1(x));  x = x + ChannelMix(ln2(x));    logits = head(ln_out(x))

TimeMix (C channels in H heads of N; x' the previous token's input, zeros before the first):
    x_□ = x + (x' - x) * μ_□ for □ in r, w, k, v, a, g     (token shift: params x_r, x_w, ...)
    r = W_r x_r;  k = W_k x_k;  v = W_v x_v
    w = -softplus(-(w0 + tanh(x_w w1) w2)) - 0.5;  decay d = exp(-exp(w)), in (0.545, 1)
    v = v + (v_first - v) * sigmoid(v0 + x_v v1 v2)  (layers > 0: the value residual to layer 0's v)
    a = sigmoid(a0 + x_a a1 a2)                       (in-context learning rate)
    g = sigmoid(x_g g1) g2                            (output gate)
    κ̂ = normalize_per_head(k * k_k);  k̃ = k * (1 + (a - 1) * k_a)
    per head, state S (N x N, value dim x key dim):
        S_t = S_{t-1} (diag(d_t) - κ̂_t (a_t ⊙ κ̂_t)^T) + v_t k̃_t^T,    y_t = S_t r_t
    out = W_o ((GroupNorm_H(y) + (Σ_head r ⊙ k̃ ⊙ r_k) v) * g)
ChannelMix:  k = x + (x' - x) * x_k;  out = W_v relu(W_k k)^2
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel, StoppingCriteria
from transformers.utils import ModelOutput

from .configuration_modrwkv import ModRWKVConfig
from .wavenet import WaveNet, WaveNetConfig

IGNORE_LABEL = -100
FEATURE_ARGUMENTS = {"image": "image_features", "audio": "audio_features", "series": "series_features"}


def as_items(features) -> list[torch.Tensor]:
    """A modality's features argument as its list of items: one tensor [L, D] is one item."""
    if features is None:
        return []
    return [features] if isinstance(features, torch.Tensor) else list(features)


@dataclass
class RWKV7State:
    """What the model remembers of each sequence; its size does not grow with the sequence.

    att_shift, ffn_shift: [L, B, C] the last token's ln1 / ln2 output per layer (x' of the next token);
    wkv: [L, B, H, N, N] the time-mix state S per layer, fp32."""

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor


def token_shift(x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """x' for every position of x [B, T, C]: the previous token's x, `previous` [B, C] before the first."""
    return torch.cat([previous[:, None].to(x.dtype), x[:, :-1]], dim=1)


def wkv7_recurrence(r, w, k, v, kk, a, S):
    """The RWKV-7 state update, one token at a time, per batch row and head (r, w, k, v, kk, a: [B, T, H, N];
    S: [B, H, N, N], value dim x key dim), in fp32:

        d_t = exp(-exp(w_t))
        S_t = S_{t-1} diag(d_t) - (S_{t-1} κ̂_t) (a_t ⊙ κ̂_t)^T + v_t k̃_t^T
        y_t = S_t r_t

    The middle term removes from S what it holds along κ̂_t, at the rate a_t (the delta rule), before v_t k̃_t^T
    writes the new association. Returns y [B, T, H, N] and the last S."""
    r, w, k, v, kk, a = (t.float() for t in (r, w, k, v, kk, a))
    d = torch.exp(-torch.exp(w))
    ys = []
    for t in range(r.shape[1]):
        removed = (S @ kk[:, t, :, :, None]) @ (a[:, t] * kk[:, t])[:, :, None, :]
        written = v[:, t, :, :, None] @ k[:, t, :, None, :]
        S = S * d[:, t, :, None, :] - removed + written
        ys.append((S @ r[:, t, :, :, None])[..., 0])
    return torch.stack(ys, dim=1), S


class TimeMix(nn.Module):
    def __init__(self, sizes: dict, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, N = sizes["n_embd"], sizes["head_size"]
        self.n_head, self.head_size = C // N, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        for symbol, rank in (("w", "decay_lora"), ("a", "a_lora"), ("v", "v_lora"), ("g", "gate_lora")):
            setattr(self, f"{symbol}1", nn.Parameter(torch.zeros(C, sizes[rank])))
            setattr(self, f"{symbol}2", nn.Parameter(torch.zeros(sizes[rank], C)))
        self.r_k = nn.Parameter(torch.zeros(self.n_head, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=64e-5)

    def forward(self, x, previous, S, v_first):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        heads = (B, T, H, N)
        dx = token_shift(x, previous) - x
        x_r, x_w, x_k, x_v, x_a, x_g = (x + dx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a,
                                                                self.x_g))
        r = self.receptance(x_r)
        k = self.key(x_k)
        v = self.value(x_v)
        w = -F.softplus(-(self.w0 + torch.tanh(x_w @ self.w1) @ self.w2)) - 0.5
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (x_v @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (x_a @ self.a1) @ self.a2)
        g = torch.sigmoid(x_g @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(heads), dim=-1)
        k = k * (1 + (a - 1) * self.k_a)

        y, S = wkv7_recurrence(r.view(heads), w.view(heads), k.view(heads), v.view(heads), kk, a.view(heads), S)
        y = self.ln_x(y.to(x.dtype).reshape(B * T, C)).view(B, T, C)
        bonus = (r.view(heads) * k.view(heads) * self.r_k).sum(dim=-1, keepdim=True) * v.view(heads)
        return self.output((y + bonus.view(B, T, C)) * g), S, v_first


class ChannelMix(nn.Module):
    def __init__(self, sizes: dict):
        super().__init__()
        C = sizes["n_embd"]
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, sizes["dim_ffn"], bias=False)
        self.value = nn.Linear(sizes["dim_ffn"], C, bias=False)

    def forward(self, x, previous):
        k = x + (token_shift(x, previous) - x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2)


class Block(nn.Module):
    def __init__(self, sizes: dict, layer_id: int):
        super().__init__()
        C = sizes["n_embd"]
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(sizes, layer_id)
        self.ffn = ChannelMix(sizes)

    def forward(self, x, v_first, att_shift, S, ffn_shift):
        """Returns x, v_first and this layer's next state: (last ln1 output, S, last ln2 output)."""
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        xa = self.ln1(x)
        out, S, v_first = self.att(xa, att_shift, S, v_first)
        x = x + out
        xf = self.ln2(x)
        x = x + self.ffn(xf, ffn_shift)
        return x, v_first, (xa[:, -1], S, xf[:, -1])


class RWKV7(nn.Module):
    """The backbone, on embeddings: hidden states after ln_out, and the state after the last token."""

    def __init__(self, sizes: dict):
        super().__init__()
        self.sizes = sizes
        self.emb = nn.Embedding(sizes["vocab_size"], sizes["n_embd"])
        self.blocks = nn.ModuleList([Block(sizes, i) for i in range(sizes["n_layer"])])
        self.ln_out = nn.LayerNorm(sizes["n_embd"])
        self.head = nn.Linear(sizes["n_embd"], sizes["vocab_size"], bias=False)

    def zero_state(self, batch_size: int, like: torch.Tensor) -> RWKV7State:
        L, C, N = self.sizes["n_layer"], self.sizes["n_embd"], self.sizes["head_size"]
        shift = like.new_zeros(L, batch_size, C)
        return RWKV7State(shift, torch.zeros(L, batch_size, C // N, N, N, device=like.device), shift.clone())

    def forward(self, x: torch.Tensor, state: RWKV7State) -> tuple[torch.Tensor, RWKV7State]:
        v_first, layers = None, []
        for i, block in enumerate(self.blocks):
            x, v_first, layer_state = block(x, v_first, state.att_shift[i], state.wkv[i], state.ffn_shift[i])
            layers.append(layer_state)
        att_shift, wkv, ffn_shift = (torch.stack(parts) for parts in zip(*layers))
        return self.ln_out(x), RWKV7State(att_shift, wkv, ffn_shift)


class Projector(nn.Module):
    """Encoder features [L, encoder_dim] -> backbone embeddings [L', C]: normalise with the training features'
    statistics, compress with a Conv1D (kernel k, stride s, no padding: L' = (L - k) // s + 1), then the adapter
    Linear(enc, m*C) -> ReLU -> Linear(m*C, C)."""

    def __init__(self, encoder_dim, model_dim, kernel, stride, adapter_scale, normalize):
        super().__init__()
        self.normalize, self.kernel = normalize, kernel
        if normalize != "none":
            self.register_buffer("feature_mean", torch.zeros(encoder_dim))
        if normalize == "standardize":  # (x - mean) / std per dimension
            self.register_buffer("feature_std", torch.ones(encoder_dim))
        if normalize == "whiten":  # (x - mean) Σ^(-1/2), ZCA whitening
            self.register_buffer("feature_whitening", torch.eye(encoder_dim))
        self.compress = nn.Conv1d(encoder_dim, encoder_dim, kernel, stride) if kernel else None
        self.adapter = nn.Sequential(nn.Linear(encoder_dim, adapter_scale * model_dim), nn.ReLU(),
                                     nn.Linear(adapter_scale * model_dim, model_dim))

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)` or `.half()` keep the feature statistics in fp32 (only moved), as the trained model
        # does; transformers' own fp32 list applies within from_pretrained(dtype=...) only
        stats = {name: b for name, b in self._buffers.items() if name.startswith("feature_")}
        super()._apply(fn, recurse)
        for name, kept in stats.items():  # a meta tensor has no values to keep (`to_empty`): its new one, in fp32
            now = self._buffers[name]
            self._buffers[name] = now.float() if kept.is_meta else kept.to(now.device)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # the normalisation in fp32 whatever the model's dtype: whitening reaches low-variance directions by
        # cancelling large components, which bf16 rounding swamps
        x = features.float()
        if self.normalize == "standardize":
            x = (x - self.feature_mean.float()) / self.feature_std.float()
        elif self.normalize == "whiten":
            x = (x - self.feature_mean.float()) @ self.feature_whitening.float()
        x = x.to(self.adapter[0].weight.dtype)
        if self.compress is not None:
            if x.shape[0] < self.kernel:
                raise ValueError(f"{x.shape[0]} feature vectors are fewer than the compression kernel {self.kernel}")
            x = self.compress(x.T[None])[0].T
        return self.adapter(x)


class TurnEnd(StoppingCriteria):
    """generate() stops a row once its reply holds the turn end "\n\n" (how training ends an answer): in one token,
    or across two ("。\n" then "\n"), which generation_config's eos ids ("\n\n" and end-of-text) do not see.
    `ids`: the config's turn_end_ids."""

    def __init__(self, ids: dict):
        self.within, self.ends, self.starts = (set(ids[k]) for k in ("within", "ends", "starts"))
        self.prompt_length = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.prompt_length is None:  # called first with one new token: the prompt's own text does not count
            self.prompt_length = input_ids.shape[1] - 1
        last = input_ids[:, -1].tolist()
        before = input_ids[:, -2].tolist() if input_ids.shape[1] - 2 >= self.prompt_length else [None] * len(last)
        return torch.tensor([t in self.within or (t in self.starts and b in self.ends) for t, b in zip(last, before)],
                            dtype=torch.bool, device=input_ids.device)


@dataclass
class ModRWKVCausalLMOutput(ModelOutput):
    """logits [B, T, V] (the last `logits_to_keep` positions when given); state: pass it back as `state` to
    continue the sequences; forecast [B, forecast_horizon]: the series forecast, when series features were given
    to a model with a forecast head."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: RWKV7State | None = None
    forecast: torch.Tensor | None = None


class ModRWKVForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ModRWKVConfig
    # the projectors' feature statistics stay fp32 in a model loaded in bf16 or fp16 (Projector.forward)
    _keep_in_fp32_modules_strict = ["feature_mean", "feature_std", "feature_whitening"]

    def __init__(self, config: ModRWKVConfig):
        super().__init__(config)
        self.backbone = RWKV7(config.backbone)
        self.projectors = nn.ModuleDict({name: Projector(**p) for name, p in config.projectors.items()})
        C = config.backbone["n_embd"]
        self.forecast_head = nn.Linear(C, config.forecast_horizon) if config.forecast_horizon else None
        # forecast = forecast_skip(the last lookback values) + forecast_head(last hidden state)
        self.forecast_skip = (nn.Linear(config.forecast_lookback, config.forecast_horizon)
                              if config.forecast_lookback else None)
        self.series_encoder = WaveNet(WaveNetConfig(**config.series_encoder)) if config.series_encoder else None
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.emb

    def get_output_embeddings(self):
        return self.backbone.head

    def item_embeddings(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """One item's features [L, encoder_dim] (a raw series [L, channels] for a model with a WaveNet) as
        backbone embeddings [L', C]."""
        if modality not in self.projectors:
            raise ValueError(f"this model has no {modality} projector (it has: {sorted(self.projectors)})")
        x = features
        if modality == "series" and self.series_encoder is not None:
            x = self.series_encoder(x.to(self.backbone.emb.weight.dtype))
        return self.projectors[modality](x)

    def expand_placeholders(self, input_ids: torch.LongTensor, **features) -> torch.LongTensor:
        """Prompts [B, T] with one placeholder token per item, each repeated as many times as its item gives
        embeddings (features as in `forward`: the items in order, row by row). The rows must come out equally
        long (padding is not supported), and every item must find its placeholder."""
        items = {m: as_items(features.get(arg)) for m, arg in FEATURE_ARGUMENTS.items()}
        rows = []
        for row in input_ids.tolist():
            ids = []
            for token in row:
                modality = next((m for m, p in self.config.placeholder_ids.items() if p == token), None)
                if modality is None:
                    ids.append(token)
                    continue
                if not items[modality]:
                    raise ValueError(f"more <{modality}> placeholders than {FEATURE_ARGUMENTS[modality]} items")
                ids += [token] * len(self.item_embeddings(modality, items[modality].pop(0)))
            rows.append(ids)
        if left := {FEATURE_ARGUMENTS[m]: len(rest) for m, rest in items.items() if rest}:
            raise ValueError(f"items without a placeholder: {left}")
        if len({len(ids) for ids in rows}) > 1:
            raise ValueError(f"the rows expand to {[len(ids) for ids in rows]} tokens: padding is not supported, "
                             "expand and run prompts of different lengths one at a time")
        return torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)

    def embed(self, input_ids: torch.LongTensor, features: dict, prompt: bool) -> torch.Tensor:
        """Token embeddings, each modality's placeholder positions (row by row, in order) replaced by its items'
        adapted features, one run per item, in order."""
        x = self.backbone.emb(input_ids)
        for modality, placeholder in self.config.placeholder_ids.items():
            rows, columns = (input_ids == placeholder).nonzero(as_tuple=True)
            items = as_items(features.get(modality))
            if not items:
                if prompt and len(rows):  # a decoding step may sample a placeholder: then it is a plain token
                    raise ValueError(f"{len(rows)} <{modality}> positions but no {FEATURE_ARGUMENTS[modality]}")
                continue
            adapted = torch.cat([self.item_embeddings(modality, item) for item in items])
            if adapted.shape[0] != len(rows):
                raise ValueError(f"{len(rows)} <{modality}> positions but the {FEATURE_ARGUMENTS[modality]} give "
                                 f"{adapted.shape[0]} vectors (see expand_placeholders)")
            x = x.index_put((rows, columns), adapted)
        return x

    def forward(self, input_ids: torch.LongTensor, image_features=None, audio_features=None, series_features=None,
                series_lookback: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                state: RWKV7State | None = None, labels: torch.LongTensor | None = None, logits_to_keep: int = 0,
                **generate_flags) -> ModRWKVCausalLMOutput:
        """input_ids [B, T]. image_features / audio_features / series_features: a tensor [L, encoder_dim] (one
        item), or a list of them, the items of that modality in the order their placeholder runs appear, row by
        row (generate() passes them with the prompt only: later steps continue the state). series_lookback
        [B, >= forecast_lookback]: the normalised lookback, for a model with a forecast skip. attention_mask: only
        all ones (padding is not supported: run prompts of different lengths one by one). labels [B, T]: the
        next-token loss, mean over labels other than -100. generate_flags: what generate() passes besides
        (use_cache, output_attentions, ...); the state is always returned."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: pass prompts of different lengths one at a time")
        features = {m: f for m, f in zip(FEATURE_ARGUMENTS, (image_features, audio_features, series_features))
                    if f is not None}
        x = self.embed(input_ids, features, prompt=state is None)
        if state is None:
            state = self.backbone.zero_state(input_ids.shape[0], x)
        hidden, state = self.backbone(x, state)
        logits = self.backbone.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            scores = self.backbone.head(hidden) if logits_to_keep else logits
            loss = F.cross_entropy(scores[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_LABEL)
        forecast = None
        if self.forecast_head is not None and "series" in features:
            forecast = self.forecast_head(hidden[:, -1])
            if self.forecast_skip is not None:
                n = self.config.forecast_lookback
                if series_lookback is None or series_lookback.dim() != 2 or series_lookback.shape[1] < n:
                    raise ValueError(f"this model forecasts from the lookback too: pass series_lookback [B, >= {n}]")
                forecast = forecast + self.forecast_skip(series_lookback[:, -n:].to(forecast.dtype))
        return ModRWKVCausalLMOutput(loss=loss, logits=logits, state=state, forecast=forecast)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """num_return_sequences > 1: the prompt's rows repeated (by transformers), and the feature items with them,
        which transformers would stretch as tensors or leave as lists. Items are the prompt's, row by row: a
        one-row prompt's are repeated whole; which of several rows' items are whose is not known here."""
        items = {name: as_items(model_kwargs.pop(name)) for name in FEATURE_ARGUMENTS.values()
                 if model_kwargs.get(name) is not None}
        if expand_size > 1 and items and input_ids is not None and input_ids.shape[0] > 1:
            raise ValueError("num_return_sequences > 1 (or num_beams > 1) with features takes a prompt of one row: "
                             "generate the rows one at a time")
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids,
                                                                        **model_kwargs)
        return input_ids, {**model_kwargs, **{name: found * expand_size for name, found in items.items()}}

    def _get_stopping_criteria(self, generation_config, stopping_criteria, tokenizer=None, **kwargs):
        criteria = super()._get_stopping_criteria(generation_config, stopping_criteria, tokenizer, **kwargs)
        if self.config.turn_end_ids:
            criteria.append(TurnEnd(self.config.turn_end_ids))
        return criteria

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        """generate(): each step after the prompt continues the returned state with the new token alone, so the
        features, which entered with the prompt, are not passed again."""
        if model_kwargs.get("use_cache", True):
            model_kwargs["state"] = outputs.state
            for name in (*FEATURE_ARGUMENTS.values(), "series_lookback"):
                model_kwargs.pop(name, None)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)
