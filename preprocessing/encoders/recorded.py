"""The frozen encoder a trained model's features came from, built from the record its folder keeps
(`encoders.json`, `modrwkv/model_folder.py`), so that inference (chat, lmms-eval) encodes media as training's
caches did: the same kind, input size, layer and weights. Features from another resolution, layer or checkpoint
are a different input; the model would answer them without any error, only worse."""

import sys
from dataclasses import dataclass

import torch

from modrwkv.model_folder import ENCODERS_FILE, read_encoders_record

from ..cache.key import FEATURE_REVISIONS, hash_model_dir
from ..cache.precision import DEFAULT, checked_stored, from_stored
from ..items import RAW_SERIES
from ..validate import Limits, decode_audio, decode_image, normalised_lookback
from . import build_encoder, build_settings
from .base import DTYPES, require_local_dir


def encoder_for(model_dir, modality: str, encoder_dir, kind: str | None = None, device="cpu"):
    """The encoder of `encoder_dir` set up as the `modality` caches of the model in `model_dir` were: the same kind,
    weights, input size, layer and dtype, its features rounded as the caches stored them (`AsStored`). A model
    without the record (saved by hand) takes `kind` with its defaults. A different kind or weights, or features our
    code has changed since (`FEATURE_REVISIONS`): ValueError."""
    recorded = read_encoders_record(model_dir).get(modality)
    if recorded is None:
        if kind is None:
            raise ValueError(f"{model_dir} does not record its {modality} encoder ({ENCODERS_FILE}); give its kind")
        return build_encoder(kind, encoder_dir, device=device)
    if kind is not None and kind != recorded["kind"]:
        raise ValueError(f"{model_dir} was trained on {recorded['kind']} {modality} features, not {kind}")
    check_revision(model_dir, recorded)
    found = hash_model_dir(require_local_dir(encoder_dir))  # before loading: other weights are never built
    if recorded.get("weights_hash") and found != recorded["weights_hash"]:
        raise ValueError(f"{encoder_dir}: not the {recorded['kind']} weights {model_dir} was trained with "
                         f"(weights sha256 {found[:12]}, trained on {recorded['weights_hash'][:12]})")
    if recorded.get("differing"):
        print(f"note: {model_dir} trained on {modality} caches of different {', '.join(recorded['differing'])}; "
              f"{encoder_dir} encodes with its defaults for those", file=sys.stderr)
    dtype = DTYPES[recorded.get("dtype") or "fp32"]
    encoder = build_encoder(recorded["kind"], encoder_dir, device=device, dtype=dtype, **build_settings(recorded))
    return AsStored(encoder, recorded.get("precision") or DEFAULT)


def check_revision(model_dir, recorded: dict) -> None:
    """Refuses features our code has changed since the model's caches were encoded (a record names its revision;
    none, a kind that had no revision then). A record from before revisions were recorded, or of caches of several
    revisions, is let through, with a note where the kind has been revised."""
    kind, now = recorded["kind"], FEATURE_REVISIONS.get(recorded["kind"], 1)
    if "revision" not in recorded or "revision" in recorded.get("differing", ()):
        if now > 1:
            print(f"note: {model_dir} does not record one revision of the {kind} features it trained on; this code "
                  f"makes revision {now} (preprocessing/cache/key.py): a model whose caches are older answers from "
                  "other features than it learnt", file=sys.stderr)
        return
    trained = recorded["revision"] or 1
    if trained != now:
        raise ValueError(f"{model_dir} was trained on revision {trained} of the {kind} features, and this code makes "
                         f"revision {now} (preprocessing/cache/key.py): train it again on caches encoded now")


class AsStored:
    """A frozen encoder whose features come back as the training caches held them: rounded through their storage
    precision (fp16, or int8 with a scale per vector), so inference reads the values training read."""

    def __init__(self, encoder, precision: str):
        self.encoder, self.precision = encoder, precision

    def encode(self, items: list, ids: list[str] | None = None) -> list[torch.Tensor]:
        ids = [str(i) for i in range(len(items))] if ids is None else list(ids)
        features = []
        for f, sample_id in zip(self.encoder.encode(items, ids), ids, strict=True):
            try:  # what the encode job rejects, refused here too
                stored = checked_stored(f.float().numpy(), self.precision)
            except ValueError as e:
                raise ValueError(f"sample {sample_id}: {e}") from None
            features.append(torch.from_numpy(from_stored(stored, self.precision)).float())
        return features

    def __getattr__(self, name):  # kind, output_dim, the model: the encoder's own
        if name == "encoder":  # not set yet (a copy being made): no recursion through this method
            raise AttributeError(name)
        return getattr(self.encoder, name)


class MissingEncoder(ValueError):
    """The model needs an encoder for a medium that nobody gave it the folder of."""


class MediaEncoders:
    """A trained model's media, from the bytes of a file (or a series' values) to its features, as the encode
    job made its training caches: the same decoding and checks (`preprocessing/validate.py`), the same window
    normalisation, the recorded encoder of each modality. What `modrwkv chat` and the served model both use.
    encoder_dirs: modality -> a local encoder folder (a series model on raw values, WaveNet's, needs none)."""

    def __init__(self, model_dir, encoder_dirs: dict, kinds: dict | None = None, limits: Limits | None = None):
        self.model_dir, self.encoder_dirs, self.kinds = model_dir, dict(encoder_dirs), dict(kinds or {})
        self.limits, self.built = limits or Limits(), {}
        self.series_record = read_encoders_record(model_dir).get("series", {})  # read once, not on every request
        self.raw_revision_checked = False

    def needs_encoder(self, modality: str) -> bool:
        """Images and audio always; a series unless the model reads its values itself (WaveNet)."""
        if modality != "series":
            return True
        recorded = self.series_record.get("kind") or self.kinds.get("series")
        return recorded not in (None, RAW_SERIES)

    def encoder(self, modality: str):
        if modality not in self.built:
            if not self.encoder_dirs.get(modality):
                raise MissingEncoder(f"no {modality} encoder: give the folder of the {modality} encoder the model "
                                     "was trained with")
            self.built[modality] = encoder_for(self.model_dir, modality, self.encoder_dirs[modality],
                                               self.kinds.get(modality))
        return self.built[modality]

    def image(self, data: bytes, sample_id: str) -> torch.Tensor:
        pixels = decode_image(data, self.limits)  # raises Rejected (a ValueError) with the reason
        return self.encoder("image").encode([pixels], [sample_id])[0]

    def audio(self, data: bytes, sample_id: str) -> torch.Tensor:
        return self.encoder("audio").encode([decode_audio(data, self.limits)], [sample_id])[0]

    def trained_window(self, values, sample_id: str):
        """The last `lookback` values of a longer series, its windows' length in training (z-scored over the whole
        series, a history of years is another input than the weeks the model read); a shorter one is refused. A
        model that records no lookback takes the series as given."""
        lookback = self.series_record.get("lookback")
        if lookback is None:
            return values
        if len(values) < lookback:
            raise ValueError(f"{sample_id}: {len(values)} values, fewer than the {lookback} of the windows the model "
                             "was trained on")
        return values[len(values) - lookback:]

    def series(self, values, sample_id: str) -> "SeriesInput":
        """A lookback window (`trained_window`) z-scored as the encode job does (`pipelines/encode.py:
        series_window`); its features are the recorded encoder's, or the normalised values themselves for a model
        with its own WaveNet."""
        if self.series_record and not self.needs_encoder("series") and not self.raw_revision_checked:
            check_revision(self.model_dir, self.series_record)  # raw windows have revisions, and no `encoder_for`
            self.raw_revision_checked = True
        values = self.trained_window(values, sample_id)
        window, mean, std = normalised_lookback(values, self.limits, sample_id, name=sample_id)
        features = self.encoder("series").encode([window[:, 0]], [sample_id])[0] if self.needs_encoder("series") \
            else window
        return SeriesInput(features, window[:, 0], float(mean), float(std))


@dataclass
class SeriesInput:
    features: torch.Tensor  # what the projector reads
    lookback: torch.Tensor  # the normalised window [L], for a forecast head that reads it too
    mean: float  # what undoes the normalisation of a forecast
    std: float
