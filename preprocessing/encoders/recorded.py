"""The frozen encoder a trained model's features came from, built from the record its folder keeps
(`encoders.json`, `modrwkv/model_folder.py`), so that inference (chat, lmms-eval) encodes media as training's
caches did: the same kind, input size, layer and weights. Features from another resolution, layer or checkpoint
are a different input; the model would answer them without any error, only worse."""

from dataclasses import dataclass

import torch

from modrwkv.model_folder import ENCODERS_FILE, read_encoders_record

from ..cache.key import hash_model_dir
from ..items import RAW_SERIES
from ..validate import Limits, decode_audio, decode_image, normalised_lookback
from . import build_encoder, build_settings
from .base import require_local_dir


def encoder_for(model_dir, modality: str, encoder_dir, kind: str | None = None, device="cpu"):
    """The encoder of `encoder_dir` set up as the `modality` caches of the model in `model_dir` were. A model
    without the record (saved by hand) takes `kind` with its defaults. A different kind or weights: ValueError."""
    recorded = read_encoders_record(model_dir).get(modality)
    if recorded is None:
        if kind is None:
            raise ValueError(f"{model_dir} does not record its {modality} encoder ({ENCODERS_FILE}); give its kind")
        return build_encoder(kind, encoder_dir, device=device)
    if kind is not None and kind != recorded["kind"]:
        raise ValueError(f"{model_dir} was trained on {recorded['kind']} {modality} features, not {kind}")
    found = hash_model_dir(require_local_dir(encoder_dir))  # before loading: other weights are never built
    if recorded.get("weights_hash") and found != recorded["weights_hash"]:
        raise ValueError(f"{encoder_dir}: not the {recorded['kind']} weights {model_dir} was trained with "
                         f"(weights sha256 {found[:12]}, trained on {recorded['weights_hash'][:12]})")
    return build_encoder(recorded["kind"], encoder_dir, device=device, **build_settings(recorded))


class MediaEncoders:
    """A trained model's media, from the bytes of a file (or a series' values) to its features, as the encode
    job made its training caches: the same decoding and checks (`preprocessing/validate.py`), the same window
    normalisation, the recorded encoder of each modality. What `modrwkv chat` and the served model both use.
    encoder_dirs: modality -> a local encoder folder (a series model on raw values, WaveNet's, needs none)."""

    def __init__(self, model_dir, encoder_dirs: dict, kinds: dict | None = None, limits: Limits | None = None):
        self.model_dir, self.encoder_dirs, self.kinds = model_dir, dict(encoder_dirs), dict(kinds or {})
        self.limits, self.built = limits or Limits(), {}

    def encoder(self, modality: str):
        if modality not in self.built:
            if not self.encoder_dirs.get(modality):
                raise ValueError(f"no {modality} encoder: give the folder of the {modality} encoder the model was "
                                 "trained with")
            self.built[modality] = encoder_for(self.model_dir, modality, self.encoder_dirs[modality],
                                               self.kinds.get(modality))
        return self.built[modality]

    def image(self, data: bytes, sample_id: str) -> torch.Tensor:
        pixels = decode_image(data, self.limits)  # raises Rejected (a ValueError) with the reason
        return self.encoder("image").encode([pixels], [sample_id])[0]

    def audio(self, data: bytes, sample_id: str) -> torch.Tensor:
        return self.encoder("audio").encode([decode_audio(data, self.limits)], [sample_id])[0]

    def series(self, values, sample_id: str) -> "SeriesInput":
        """A lookback window z-scored as the encode job does (`pipelines/encode.py: series_window`); its features
        are the recorded encoder's, or the normalised values themselves for a model with its own WaveNet."""
        window, mean, std = normalised_lookback(values, self.limits, sample_id, name=sample_id)
        recorded = read_encoders_record(self.model_dir).get("series", {}).get("kind") or self.kinds.get("series")
        features = window if recorded in (None, RAW_SERIES) else self.encoder("series").encode([window[:, 0]],
                                                                                                [sample_id])[0]
        return SeriesInput(features, window[:, 0], float(mean), float(std))


@dataclass
class SeriesInput:
    features: torch.Tensor  # what the projector reads
    lookback: torch.Tensor  # the normalised window [L], for a forecast head that reads it too
    mean: float  # what undoes the normalisation of a forecast
    std: float
