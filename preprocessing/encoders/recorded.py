"""The frozen encoder a trained model's features came from, built from the record its folder keeps
(`encoders.json`, `modrwkv/model_folder.py`), so that inference (chat, lmms-eval) encodes media as training's
caches did: the same kind, input size, layer and weights. Features from another resolution, layer or checkpoint
are a different input; the model would answer them without any error, only worse."""

from modrwkv.model_folder import ENCODERS_FILE, read_encoders_record

from ..cache.key import hash_model_dir
from . import build_encoder
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
    settings = {k: recorded[k] for k in ("image_size", "layer") if recorded.get(k) is not None}
    return build_encoder(recorded["kind"], encoder_dir, device=device, **settings)
