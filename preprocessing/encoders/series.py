"""Frozen time-series encoders: Fracast-0's context encoder (per-step features) and Timer (per-patch
features). Both take univariate series, normalise each one on its own and refuse NaN/inf naming the sample."""

import math

import numpy as np
import torch

from modrwkv.wavenet import normalize_series

from .base import FrozenEncoder, require_local_dir
from .fracast import load_fracast
from .timer import TimerModel


def normalized(series, sample_id: str) -> torch.Tensor:
    """A 1-D series as float32, z-scored over its whole length (NaN/inf and < 2 points are refused)."""
    values = torch.as_tensor(np.asarray(series, dtype=np.float32))
    if values.ndim != 1:
        raise ValueError(f"sample {sample_id}: expected a univariate series [L], got shape {tuple(values.shape)}")
    return normalize_series(values[:, None], sample_id)[0][:, 0]


class FracastEncoder(FrozenEncoder):
    """Per-step features [L, 64] for series of 8 to 2048 points, left-padded into Fracast's 2048-step window."""

    kind = "fracast"
    min_length = 8  # Fracast-0's own minimum of observed points

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        path = require_local_dir(model_dir)
        super().__init__(path, load_fracast(path), device, dtype)

    @property
    def output_dim(self) -> int:
        return self.model.config.d_model

    def encode_batch(self, items, ids) -> list[torch.Tensor]:
        width = self.model.config.context
        values = torch.zeros(len(items), width)
        observed = torch.zeros(len(items), width, dtype=torch.bool)
        lengths = []
        for row, (s, sid) in enumerate(zip(items, ids)):
            z = normalized(s, sid)
            if not self.min_length <= len(z) <= width:
                raise ValueError(f"sample {sid}: {len(z)} points; Fracast takes {self.min_length} to {width}")
            # Fracast-0 was trained on min-max scaled windows; that scaling ignores the z-score (affine-invariant)
            values[row, width - len(z):] = (z - z.min()) / (z.max() - z.min()).clamp(min=1e-5)
            observed[row, width - len(z):] = True
            lengths.append(len(z))
        hidden = self.model(values.to(self.device, self.dtype), observed.to(self.device)).float().cpu()
        return [h[width - n:] for h, n in zip(hidden, lengths)]


class TimerEncoder(FrozenEncoder):
    """Per-patch features [ceil(L / 96), D]; a series whose length is not a whole number of patches is
    left-padded with its mean (0 after z-scoring), so the last patch always ends at the last point."""

    kind = "timer"

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        path = require_local_dir(model_dir)
        super().__init__(path, TimerModel.from_pretrained(path, local_files_only=True), device, dtype)
        self.patch = self.model.config.input_token_len

    def encode_batch(self, items, ids) -> list[torch.Tensor]:
        zs = [normalized(s, sid) for s, sid in zip(items, ids)]
        patches = [math.ceil(len(z) / self.patch) for z in zs]
        batch = torch.zeros(len(zs), max(patches) * self.patch)
        for row, (z, n) in enumerate(zip(zs, patches)):
            # right-padding the batch is exact: causal attention keeps later (padding) patches out of earlier ones
            batch[row, n * self.patch - len(z) : n * self.patch] = z
        hidden = self.model(batch.to(self.device, self.dtype)).float().cpu()
        return [h[:n] for h, n in zip(hidden, patches)]


SERIES_ENCODERS = {cls.kind: cls for cls in (FracastEncoder, TimerEncoder)}
