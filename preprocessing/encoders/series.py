"""Frozen time-series encoders: Fracast-0's context encoder (per-step features) and Timer (per-patch
features). Both take univariate series, normalise each one on its own and refuse NaN/inf naming the sample."""

import math

import numpy as np
import torch

from modrwkv.wavenet import normalize_series

from .base import EncoderInputs, FrozenEncoder, check_model_type, require_local_dir
from .fracast import load_fracast, read_fracast_config
from .timer import TimerConfig, TimerModel


def normalized(series, sample_id: str) -> torch.Tensor:
    """A 1-D series z-scored over its whole length, in float64 (a level of 1e7 moving by 0.01 survives), returned as
    float32 (NaN/inf and < 2 points are refused)."""
    values = torch.as_tensor(np.asarray(series, dtype=np.float64))
    if values.ndim != 1:
        raise ValueError(f"sample {sample_id}: expected a univariate series [L], got shape {tuple(values.shape)}")
    return normalize_series(values[:, None], sample_id)[0][:, 0].float()


class MinMaxInputs(EncoderInputs):
    """A series of `min_length` to `context` points -> z-scored, then min-max scaled as Fracast-0 was trained:
    {"values": [L]}."""

    min_length = 8  # Fracast-0's own minimum of observed points

    def __init__(self, context: int):
        self.context = context

    def prepare(self, series, sample_id: str) -> dict[str, np.ndarray]:
        z = normalized(series, sample_id)
        if not self.min_length <= len(z) <= self.context:
            raise ValueError(f"sample {sample_id}: {len(z)} points; Fracast takes {self.min_length} to {self.context}")
        # the min-max scaling ignores the z-score (affine-invariant); the z-score refused NaN/inf with the sample named
        return {"values": ((z - z.min()) / (z.max() - z.min()).clamp(min=1e-5)).numpy()}


class FracastEncoder(FrozenEncoder):
    """Per-step features [L, 64] for series of 8 to 2048 points, left-padded into Fracast's 2048-step window."""

    kind = "fracast"

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        path = require_local_dir(model_dir)
        model = load_fracast(path)
        super().__init__(path, model, MinMaxInputs(model.config.context), device, dtype)

    @classmethod
    def build_inputs(cls, model_dir) -> MinMaxInputs:
        return MinMaxInputs(read_fracast_config(require_local_dir(model_dir)).context)

    @property
    def output_dim(self) -> int:
        return self.model.config.d_model

    def forward(self, prepared) -> list[torch.Tensor]:
        width, lengths = self.model.config.context, [len(p["values"]) for p in prepared]
        values = np.zeros((len(prepared), width), np.float32)
        observed = np.zeros((len(prepared), width), bool)
        for row, (p, n) in enumerate(zip(prepared, lengths)):
            values[row, width - n:], observed[row, width - n:] = p["values"], True
        hidden = self.model(torch.from_numpy(values).to(self.device, self.dtype),
                            torch.from_numpy(observed).to(self.device)).float().cpu()
        return [h[width - n:] for h, n in zip(hidden, lengths)]


class ZScoreInputs(EncoderInputs):
    """A series -> z-scored over its whole length: {"values": [L]}."""

    def prepare(self, series, sample_id: str) -> dict[str, np.ndarray]:
        return {"values": normalized(series, sample_id).numpy()}


class TimerEncoder(FrozenEncoder):
    """Per-patch features [ceil(L / 96), D]; a series whose length is not a whole number of patches is
    left-padded with its mean (0 after z-scoring), so the last patch always ends at the last point."""

    kind = "timer"

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        path = require_local_dir(model_dir)
        check_model_type(path, self.kind, TimerConfig.model_type)
        super().__init__(path, TimerModel.from_pretrained(path, local_files_only=True), ZScoreInputs(), device,
                         dtype)
        self.patch = self.model.config.input_token_len

    @classmethod
    def build_inputs(cls, model_dir) -> ZScoreInputs:
        return ZScoreInputs()

    def forward(self, prepared) -> list[torch.Tensor]:
        zs = [p["values"] for p in prepared]
        patches = [math.ceil(len(z) / self.patch) for z in zs]
        batch = np.zeros((len(zs), max(patches) * self.patch), np.float32)
        for row, (z, n) in enumerate(zip(zs, patches)):
            # right-padding the batch is exact: causal attention keeps later (padding) patches out of earlier ones
            batch[row, n * self.patch - len(z) : n * self.patch] = z
        hidden = self.model(torch.from_numpy(batch).to(self.device, self.dtype)).float().cpu()
        return [h[:n] for h, n in zip(hidden, patches)]


SERIES_ENCODERS = {cls.kind: cls for cls in (FracastEncoder, TimerEncoder)}
