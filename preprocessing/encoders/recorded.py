"""Which frozen encoder a trained model's features came from, recorded beside its weights (`encoders.json`), so
that inference (chat, lmms-eval) encodes media as training's caches did: the same kind, input size, layer and
weights. Features from another resolution, layer or checkpoint are a different input; the model would answer
them without any error, only worse."""

import json
from pathlib import Path

from ..cache.key import hash_model_dir
from . import build_encoder
from .base import require_local_dir

ENCODERS_FILE = "encoders.json"
RECORDED = ("kind", "dtype", "image_size", "layer", "weights_hash")  # what of a store key decides the features


def write_encoders_record(model_dir, store_keys: dict[str, dict]) -> None:
    """store_keys: modality -> the feature store key of the caches it was trained on (the cache manifests')."""
    record = {modality: {k: key.get(k) for k in RECORDED} for modality, key in store_keys.items()}
    (Path(model_dir) / ENCODERS_FILE).write_text(json.dumps(record, indent=1) + "\n")


def read_encoders_record(model_dir) -> dict[str, dict]:
    path = Path(model_dir) / ENCODERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


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
    settings = {k: recorded[k] for k in ("image_size", "layer") if recorded.get(k) is not None}
    return build_encoder(recorded["kind"], encoder_dir, device=device, **settings)
