"""ModRWKV: encoder features -> projector (normalisation, Conv1D compression, MLP adapter) -> spliced into the
RWKV-7 input.

The frozen encoders live in `preprocessing/` (their outputs are cached); this model starts from features.
Placeholder positions in `input_ids` (see `conversation.py`) receive the adapted features, in order; every
other position is an ordinary token embedding. Phase I trains the projectors (and the forecasting head);
phase II trains the backbone as well.

The projector, from encoder features to backbone embeddings:

    features [L, enc] --normalize--> --Conv1D(k, s), no padding--> [L', enc], L' = floor((L - k) / s) + 1
                      --Linear(enc, m*C) -> ReLU -> Linear(m*C, C)--> [L', C]
(k, s) = (0, 0) means no compression. The paper's Table 7: 577 tokens -> 288 / 192 / 144 for (3,2) / (4,3) / (5,4).

`normalize`: "standardize" is (x - mean) / std per dimension; "whiten" is (x - mean) W with W = Σ^(-1/2), the ZCA
whitening matrix of the training features (`set_feature_stats`; saved with the weights). A frozen encoder's
informative directions can have a small spread (DINOv2 is trained to ignore colour jitter, so colour lies in
low-variance directions that are not axis-aligned); the adapter learns them far faster once every direction has
unit variance (measured in benchmarks/RESULTS.md, "Learning quality": feature normalisation).
"""

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from modrwkv_kernels import as_layout, on_host, to_device_nowait

from .checkpoint import CheckpointError, cpu_state_dict, load_state_strict, refuse_quantized
from .config import RWKV7Config
from .conversation import IGNORE, PLACEHOLDER_IDS
from .model import RWKV7, RWKV7State, last_valid
from .model_folder import (CONFIG_FILE, in_adapter, read_json_object, read_model_folder, resolve_backbone,
                           write_model_folder)
from .wavenet import WaveNet, WaveNetConfig

Features = list[tuple[str, torch.Tensor]]  # one sample's items in order: (modality, [L, encoder_dim])

Normalize = Literal["none", "standardize", "whiten"]
# Each modality's measured best (benchmarks/RESULTS.md, "Learning quality"): whitening lifts DINOv2's colour (0.46 -> 0.86)
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
        if self.stride > self.kernel:  # the windows would leave vectors between them unread
            raise ValueError(f"compression stride {self.stride} is over its kernel {self.kernel}: the vectors between "
                             "windows would never be read")
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

    def _apply(self, fn, recurse=True):
        """As nn.Module moves and casts, but the feature statistics stay in fp32 (a model cast to bf16, as DeepSpeed
        and prepare_for_inference cast it, would round them; see forward): they only move to the new device."""
        stats = {name: b for name, b in self._buffers.items() if name.startswith("feature_")}
        super()._apply(fn, recurse)
        for name, kept in stats.items():  # a meta tensor has no values to keep (`to_empty`): its new one, in fp32
            now = self._buffers[name]
            self._buffers[name] = now.float() if kept.is_meta else kept.to(now.device)
        return self

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

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The features minus their training mean, divided by the std or whitened; in fp32 whatever the model
        computes in (autocast off): whitening reaches the features' low-variance directions by cancelling large
        components, and bf16 features or statistics put noise into them (1.3-3.2 % in the median direction of the
        training caches, more in the smallest: benchmarks/whitening_precision.py).
        Unchanged without statistics (`normalize: none`)."""
        if self.config.normalize == "none":
            return x
        with torch.autocast(x.device.type, enabled=False):
            x = x.float() - self.feature_mean
            if self.config.normalize == "standardize":
                return x / self.feature_std
            return x @ self.feature_whitening

    def forward(self, features: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[L, enc] or [B, L, enc] -> [L', C] or [B, L', C]. `dtype`: the one the layers after the normalisation
        compute in (the model's; default: the features')."""
        squeeze = features.dim() == 2
        x = features[None] if squeeze else features
        if x.shape[-1] != self.config.encoder_dim:
            raise ValueError(f"features have width {x.shape[-1]}, the projector expects {self.config.encoder_dim}")
        x = self.normalise(x).to(dtype or x.dtype)
        if self.compress is not None:
            if x.shape[1] < self.config.kernel:
                raise ValueError(f"{x.shape[1]} feature vectors are fewer than the compression kernel {self.config.kernel}")
            x = self.compress(x.transpose(1, 2)).transpose(1, 2)
        x = self.adapter(x)
        return x[0] if squeeze else x


@dataclass
class ModRWKVConfig:
    backbone: RWKV7Config
    projectors: dict[str, ProjectorConfig] = field(default_factory=dict)  # by modality: image, audio, series
    forecast_horizon: int = 0  # > 0: a regression head predicts this many future series values
    series_encoder: WaveNetConfig | None = None  # trainable WaveNet run on raw (normalised) series items
    # > 0: the forecast adds a linear map of the last `forecast_lookback` normalised lookback values (see ModRWKV)
    forecast_lookback: int = 0

    def __post_init__(self):
        unknown = set(self.projectors) - set(PLACEHOLDER_IDS)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {sorted(PLACEHOLDER_IDS)}")
        self.projectors = {name: self.resolved(name, p) for name, p in self.projectors.items()}
        for name, p in self.projectors.items():
            if p.model_dim != self.backbone.n_embd:
                raise ValueError(f"{name} projector outputs {p.model_dim}, the backbone width is {self.backbone.n_embd}")
        if self.forecast_lookback < 0 or (self.forecast_lookback and not self.forecast_horizon):
            raise ValueError(f"forecast_lookback {self.forecast_lookback} needs a forecast_horizon > 0")
        series = self.projectors.get("series")
        if self.series_encoder is not None and series is not None and series.encoder_dim != self.series_encoder.hidden:
            raise ValueError(f"the series projector takes width {series.encoder_dim}, WaveNet gives {self.series_encoder.hidden}")

    def resolved(self, modality: str, p: ProjectorConfig) -> ProjectorConfig:
        """`p` with the backbone's width and the modality's default normalisation where left open. WaveNet's
        output is trained, not cached, so series behind a WaveNet are not normalised by default."""
        if not p.encoder_dim:
            raise ValueError(f"the {modality} projector's encoder_dim is not set (the features' width)")
        default = "none" if modality == "series" and self.series_encoder else DEFAULT_NORMALIZE[modality]
        return replace(p, model_dim=p.model_dim or self.backbone.n_embd, normalize=p.normalize or default)

    def to_dict(self) -> dict:
        return {"backbone": self.backbone.to_dict(), "projectors": {k: asdict(v) for k, v in self.projectors.items()},
                "forecast_horizon": self.forecast_horizon, "forecast_lookback": self.forecast_lookback,
                "series_encoder": asdict(self.series_encoder) if self.series_encoder else None}

    @classmethod
    def from_dict(cls, d: dict) -> "ModRWKVConfig":
        return cls(backbone=RWKV7Config.from_dict(d["backbone"]),
                   projectors={k: ProjectorConfig(**v) for k, v in d.get("projectors", {}).items()},
                   forecast_horizon=d.get("forecast_horizon", 0), forecast_lookback=d.get("forecast_lookback", 0),
                   series_encoder=WaveNetConfig(**d["series_encoder"]) if d.get("series_encoder") else None)

    @classmethod
    def read(cls, directory) -> "ModRWKVConfig":
        """The config of a ModRWKV folder; CheckpointError naming its file when that holds no ModRWKV config."""
        path = Path(directory) / CONFIG_FILE
        return cls.from_folder_dict(read_json_object(path), path)

    @classmethod
    def from_folder_dict(cls, d: dict, path: Path) -> "ModRWKVConfig":
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a ModRWKV config ({type(e).__name__}: {e})") from e


class LossUnits(NamedTuple):
    tokens: int  # labelled tokens: lm_loss is their mean
    answering: int  # samples with any
    values: int  # forecast values: forecast_loss is their mean
    forecasting: int  # samples with a forecast target
    samples: int


@dataclass
class ModRWKVOutput:
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    forecast_loss: torch.Tensor | None
    logits: torch.Tensor | None
    state: RWKV7State
    forecast: torch.Tensor | None = None


class ModRWKV(nn.Module):
    def __init__(self, config: ModRWKVConfig, backbone: RWKV7 | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else RWKV7(config.backbone)
        self.projectors = nn.ModuleDict({name: Projector(cfg) for name, cfg in config.projectors.items()})
        C = config.backbone.n_embd
        self.forecast_head = nn.Linear(C, config.forecast_horizon) if config.forecast_horizon else None
        # forecast = skip(lookback) + head(hidden). The skip starts as the naive forecast (the last value,
        # repeated) and can become any linear map of the lookback, what a ridge regression fits; the head starts
        # at zero and learns what the backbone adds. From scratch, the head alone lost to seasonal naive.
        self.forecast_skip = None
        if config.forecast_lookback:
            self.forecast_skip = nn.Linear(config.forecast_lookback, config.forecast_horizon)
            with torch.no_grad():
                self.forecast_skip.weight.zero_()
                self.forecast_skip.weight[:, -1] = 1.0
                self.forecast_skip.bias.zero_()
                self.forecast_head.weight.zero_()
                self.forecast_head.bias.zero_()
        self.series_encoder = WaveNet(config.series_encoder) if config.series_encoder else None

    # ---- phases -------------------------------------------------------------------------------------------
    def set_phase(self, phase: int) -> None:
        """Phase I: projectors, forecast head and WaveNet only. Phase II: the backbone too."""
        if phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2, got {phase}")
        self.requires_grad_(True)
        self.backbone.requires_grad_(phase == 2)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ---- sequence assembly --------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, features: list[Features], sample_ids=None,
              cu_seqlens=None) -> torch.Tensor:
        """Token embeddings with every placeholder run replaced by its item's adapted features. One feature list
        per row, or per packed sequence of a row [1, T] (cu_seqlens: their offsets). The placeholders are found
        on the host (`input_ids` read back once if given on the device)."""
        ids = self.backbone.check_input_ids(input_ids).numpy()
        B, T = input_ids.shape
        device = self.backbone.emb.weight.device
        offsets = None if cu_seqlens is None else as_layout(cu_seqlens, T, device).offsets
        # (row, start, end) of every sample
        spans = ([(b, 0, T) for b in range(B)] if offsets is None
                 else [(0, start, end) for start, end in zip(offsets, offsets[1:])])
        if len(features) != len(spans):
            raise ValueError(f"{len(spans)} sequences but feature lists for {len(features)}")
        x = self.backbone.emb(to_device_nowait(input_ids, device))
        rows = list(x.unbind(0))
        for i, ((b, start, end), items) in enumerate(zip(spans, features)):
            name = sample_ids[i] if sample_ids is not None else str(i)
            for modality, placeholder in PLACEHOLDER_IDS.items():
                positions = start + np.flatnonzero(ids[b, start:end] == placeholder)
                mine = [to_device_nowait(f, device) for m, f in items if m == modality]  # a CPU cache's, a GPU model
                if not mine:
                    if len(positions):
                        raise ValueError(f"sample {name}: {len(positions)} <{modality}> positions but no {modality} features")
                    continue
                if modality not in self.projectors:
                    raise ValueError(f"sample {name}: the model has no {modality} projector")
                projector = self.projectors[modality]
                if modality == "series" and self.series_encoder is not None:
                    mine = [self.series_encoder(f.to(x.dtype)) for f in mine]
                adapted = torch.cat([projector(f, x.dtype) for f in mine])
                if adapted.shape[0] != len(positions):
                    raise ValueError(
                        f"sample {name}: {len(positions)} <{modality}> positions but the features give "
                        f"{adapted.shape[0]} vectors after compression"
                    )
                # in the embeddings' dtype: under autocast the projector computes in bf16 while the embedding stays fp32
                # (CUDA's autocast casts index_put's source itself, CPU's does not)
                rows[b] = rows[b].index_put((to_device_nowait(torch.from_numpy(positions), device),),
                                            adapted.to(rows[b].dtype))
        return torch.stack(rows)

    def forward(self, input_ids, features, attention_mask=None, labels=None, state=None,
                series_target=None, sample_ids=None, return_logits: bool = True,
                series_lookback=None, cu_seqlens=None) -> ModRWKVOutput:
        """With labels, the LM loss (next-token, labels aligned with input_ids): the mean over every labelled
        token of the batch. return_logits=False skips the head except at labelled positions: what training wants
        with a 65536-word vocabulary. series_lookback [B, L >= forecast_lookback]: the normalised lookback, for a
        model with a forecast skip. cu_seqlens: the samples are packed into one row [1, T] at these offsets
        (features, series_target, series_lookback and the returned state are then per sample)."""
        device = self.backbone.emb.weight.device
        if labels is not None and labels.shape != input_ids.shape:  # else they would score other positions
            raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}, unshifted (position t "
                             f"learns the label at t + 1), got {tuple(labels.shape)}")
        packed = None if cu_seqlens is None else as_layout(cu_seqlens, input_ids.shape[1], device)
        embeds = self.embed(input_ids, features, sample_ids, packed)
        hidden, state = self.backbone.forward_hidden(inputs_embeds=embeds, state=state, attention_mask=attention_mask,
                                                     cu_seqlens=packed)
        logits = self.backbone.head(hidden) if return_logits else None
        lm_loss = forecast_loss = forecast = None
        learned = None if labels is None else self.learned_positions(labels, None if packed is None else packed.offsets)
        if learned is not None and len(learned[0]):  # forecasting-only batches have no text targets
            vocab = self.backbone.config.vocab_size
            if learned[1].min() < 0 or learned[1].max() >= vocab:  # named here, not a device assert on a GPU
                raise ValueError(f"labels must be token ids in [0, {vocab}) or {IGNORE} (not learned), got "
                                 f"{sorted(set(learned[1][(learned[1] < 0) | (learned[1] >= vocab)].tolist()))[:5]}")
            where, targets = (to_device_nowait(torch.from_numpy(a), device) for a in learned)
            if logits is not None:
                scores = logits.flatten(0, 1).index_select(0, where)
            else:
                scores = self.backbone.head(hidden.flatten(0, 1).index_select(0, where))
            lm_loss = F.cross_entropy(scores.float(), targets)
        if self.forecasts(features):
            lengths = None if attention_mask is None else to_device_nowait(attention_mask, device).long().sum(1)
            forecast = self.forecast_head(last_valid(hidden, lengths, None, packed))
            if self.forecast_skip is not None:
                forecast = forecast + self.forecast_skip(self.lookback_window(series_lookback).to(forecast.dtype))
            if series_target is not None:
                if series_target.shape != forecast.shape:  # mse_loss would broadcast one against the other
                    raise ValueError(f"series_target must be [forecasts, horizon] = {tuple(forecast.shape)}, got "
                                     f"{tuple(series_target.shape)}")
                forecast_loss = F.mse_loss(forecast.float(), series_target.float())
        parts = [x for x in (lm_loss, forecast_loss) if x is not None]
        loss = sum(parts) if parts else None
        return ModRWKVOutput(loss, lm_loss, forecast_loss, logits, state, forecast)

    def forecasts(self, features: list[Features]) -> bool:
        """Whether a batch with these features gets a forecast (and, given its target, a forecast loss)."""
        return self.forecast_head is not None and any(m == "series" for items in features for m, _ in items)

    def loss_units(self, labels: torch.Tensor, features: list[Features], series_target=None,
                   cu_seqlens=None) -> "LossUnits":
        """What `forward`'s lm_loss and forecast_loss are the means over, and over how many of the batch's samples,
        counted on the host before it runs (a trainer weighs each micro-batch's means by them)."""
        T = labels.shape[1]
        offsets = None if cu_seqlens is None else as_layout(cu_seqlens, T).offsets
        where = self.learned_positions(labels, offsets)[0]
        owners = where // T if offsets is None else np.searchsorted(offsets, where % T, side="right") - 1
        forecasting = series_target is not None and self.forecasts(features)
        return LossUnits(tokens=len(where), answering=len(np.unique(owners)),
                         values=series_target.numel() if forecasting else 0,
                         forecasting=series_target.shape[0] if forecasting else 0, samples=len(features))

    @staticmethod
    def learned_positions(labels: torch.Tensor, offsets=None) -> tuple[np.ndarray, np.ndarray]:
        """(flat indices into [B, T] of the positions whose next token is learned, those tokens), found on the
        host (`labels` are read back once if given on the device). offsets: the packed samples' starts in a row
        [1, T], and T."""
        labels = on_host(labels).numpy()
        targets = np.full_like(labels, IGNORE)
        targets[:, :-1] = labels[:, 1:]  # position t learns the token at t + 1
        if offsets is not None:  # a sample's last token predicts nothing of the next sample
            targets[:, np.asarray(offsets[1:-1], dtype=np.int64) - 1] = IGNORE
        where = np.flatnonzero(targets != IGNORE)
        return where, targets.reshape(-1)[where]

    def lookback_window(self, series_lookback) -> torch.Tensor:
        """The last forecast_lookback values of each normalised lookback, [B, forecast_lookback]."""
        n = self.config.forecast_lookback
        if series_lookback is None:
            raise ValueError("this model forecasts from the lookback too: pass series_lookback")
        if series_lookback.dim() != 2 or series_lookback.shape[1] < n:
            raise ValueError(f"series_lookback must be [B, >= {n}], got {tuple(series_lookback.shape)}")
        return series_lookback[:, -n:]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, features: list[Features], state: RWKV7State | None = None,
                attention_mask: torch.Tensor | None = None, sample_ids=None):
        """Runs prompts (features injected here, and only here); returns last-position logits [B, V] and state.
        attention_mask ([B, T], right padding): prompts of different lengths in one pass, each row's logits at
        its last real token and its state after it. sample_ids: each row's name in errors, as `embed` takes."""
        embeds = self.embed(input_ids, features, sample_ids)
        if attention_mask is None:
            logits, state = self.backbone(inputs_embeds=embeds, state=state, logits_to_keep=1)
            return logits[:, -1], state
        hidden, state = self.backbone.forward_hidden(inputs_embeds=embeds, state=state, attention_mask=attention_mask)
        last = attention_mask.long().sum(dim=1) - 1  # an index, whatever the mask's dtype (the backbone takes any)
        if bool((last < 0).any()):  # -1 would read the last column: padding's logits
            raise ValueError(f"prefill: rows {(last < 0).nonzero().flatten().tolist()} of the attention_mask hold no "
                             "token")
        return self.backbone.head(hidden[torch.arange(len(hidden), device=hidden.device), last]), state

    # ---- save / load: the folder's layout lives in model_folder.py ----------------------------------------
    def save_pretrained(self, directory, adapter_only: bool = False, backbone_source: dict | None = None,
                        encoders: dict[str, dict] | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Config and weights; adapter_only writes everything but the backbone (phase I's output).
        backbone_source ({"path": the backbone's directory or .pth, ...}) lets `from_pretrained` find the backbone by
        itself; encoders (modality -> feature store key) records the encoders inference must use. state_dict, as
        in transformers, is written in place of the module's own (a trainer's fp32 master weights of a bf16
        module); it must hold the names written (adapter_only: the backbone's may be left out)."""
        def written(name: str) -> bool:
            return in_adapter(name) or not adapter_only

        # first: a model that cannot be saved (quantized) leaves no partial folder
        if state_dict is None:
            state = cpu_state_dict(self, written)
        else:
            refuse_quantized(self)
            state = {k: v for k, v in state_dict.items() if written(k)}
            own = {k: v.shape for k, v in self.state_dict().items() if written(k)}
            if differ := set(own) ^ set(state):
                raise ValueError(f"state_dict does not hold the model's tensor names ({len(differ)} differ, "
                                 f"e.g. {min(differ)})")
            if reshaped := sorted(k for k, shape in own.items() if state[k].shape != shape):
                raise ValueError(f"state_dict's {reshaped[0]} is {tuple(state[reshaped[0]].shape)}, the model's "
                                 f"{tuple(own[reshaped[0]])} ({len(reshaped)} tensors differ in shape)")
        write_model_folder(directory, self.config.to_dict(), state, adapter_only, backbone_source, encoders)

    @classmethod
    def from_pretrained(cls, directory, backbone: RWKV7 | None = None) -> "ModRWKV":
        """A full checkpoint, or an adapter-only one with the `backbone` it was trained on (default: the one
        its backbone_source.json names, in fp32 as a full checkpoint loads, whatever dtype it was saved in; a
        given backbone's dtype is the whole model's)."""
        folder = read_model_folder(directory)
        config = ModRWKVConfig.from_folder_dict(folder.config, Path(directory) / CONFIG_FILE)
        if not folder.adapter_only:
            model = cls(config)
            load_state_strict(model, folder.weights, folder.weights_file)
            return model.eval()
        if backbone is None:
            backbone = RWKV7.from_pretrained(resolve_backbone(directory), dtype=torch.float32)
        if backbone.config != config.backbone:
            raise CheckpointError(f"{folder.weights_file}: trained on backbone {config.backbone}, given {backbone.config}")
        model = cls(config, backbone=backbone)
        load_state_strict(model, {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}, **folder.weights},
                          folder.weights_file)
        return model.to(backbone.emb.weight.dtype).eval()  # the adapter was built in fp32
