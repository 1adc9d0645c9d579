"""Frozen encoders: raw images / audio / series -> feature sequences [L, D], loaded from local directories only.

`build_encoder(kind, model_dir)` picks the wrapper by registry name. Every wrapper exposes `kind`,
`output_dim`, `weights_hash()` (the feature cache keys on it) and one call for every modality,
`encode(items, ids) -> list[Tensor [L, D]]`: items are RGB images (PIL or uint8 [H, W, 3]),
`preprocessing.items.Audio(wave, rate)` clips or 1-D series; bad items raise ValueError naming their id.
"""

from .audio import AUDIO_ENCODERS
from .series import SERIES_ENCODERS
from .vision import VISION_ENCODERS

ENCODERS = {**VISION_ENCODERS, **AUDIO_ENCODERS, **SERIES_ENCODERS}


def build_encoder(kind: str, model_dir, **kwargs):
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r}; registered: {sorted(ENCODERS)}")
    return ENCODERS[kind](model_dir, **kwargs)


__all__ = ["ENCODERS", "build_encoder"]
