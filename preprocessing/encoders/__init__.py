"""Frozen encoders: raw images / audio / series -> feature sequences [L, D], loaded from local directories only.

`build_encoder(kind, model_dir)` picks the wrapper by registry name. Every wrapper exposes `kind`,
`output_dim`, `weights_hash()` (the feature cache keys on it) and one call for every modality,
`encode(items, ids) -> list[Tensor [L, D]]`: items are RGB images (PIL or uint8 [H, W, 3]),
`preprocessing.items.Audio(wave, rate)` clips or 1-D series; bad items raise ValueError naming their id.
`encode` is `forward` (the batched model) over `inputs.prepare(item, id)` (the host's share: processor, log-mel,
normalisation); `build_inputs(kind, model_dir)` builds that host half alone, without the weights.
"""

from .audio import AUDIO_ENCODERS
from .series import SERIES_ENCODERS
from .vision import VISION_ENCODERS

ENCODERS = {**VISION_ENCODERS, **AUDIO_ENCODERS, **SERIES_ENCODERS}


def encoder_class(kind: str):
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r}; registered: {sorted(ENCODERS)}")
    return ENCODERS[kind]


BUILD_SETTINGS = ("image_size", "layer")  # what an encoder is built with beyond its kind and folder (vision only)
MODEL_ONLY_SETTINGS = ("layer",)  # which of them the host half does not read


def build_settings(section: dict) -> dict:
    """The build settings an encode config's encoder section or a model's encoders record sets; an unset (None) one
    keeps the encoder's default (layer 0, the embeddings, is set)."""
    return {name: section[name] for name in BUILD_SETTINGS if section.get(name) is not None}


def build_encoder(kind: str, model_dir, **kwargs):
    return encoder_class(kind)(model_dir, **kwargs)


def build_inputs(kind: str, model_dir, **settings):
    """The `EncoderInputs` of `build_encoder(kind, model_dir, **settings)`, its weights left unread."""
    return encoder_class(kind).build_inputs(
        model_dir, **{name: value for name, value in settings.items() if name not in MODEL_ONLY_SETTINGS})


__all__ = ["AUDIO_ENCODERS", "ENCODERS", "SERIES_ENCODERS", "VISION_ENCODERS", "build_encoder", "build_inputs",
           "build_settings"]
