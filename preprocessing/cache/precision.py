"""How a feature store holds each item's vectors (`cache.precision`, part of the store's key):

- fp16: the vectors as they are, 2 bytes a value (encoders run in fp32 or bf16; fp16 keeps bf16's values whole
  and fp32's to 3 significant digits);
- int8: each vector v scaled by its own absmax, round(v * 127 / max|v|), with that scale (max|v| / 127) kept as fp16
  beside it: 1 byte a value plus 2 a vector, 0.50x of fp16 at width 384 or 768; the error of a value is at most
  half a step (its vector's stored scale, about max|v| / 127).

An int8 item is one .npy of int8 [L, D + 2]: the codes, then the scale's two fp16 bytes (one file per item, as for
fp16, read with allow_pickle=False). Readers get float32 back (fp16 items as stored).
"""

from typing import Literal

import numpy as np

Precision = Literal["fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp16", "int8")
DEFAULT: Precision = "fp16"  # a store key names its precision only when it is another (keys from before keep theirs)


def key_precision(key: dict) -> Precision:
    """The precision a store key (or a manifest's copy of it) was written in."""
    return key.get("precision", DEFAULT)


def to_stored(features: np.ndarray, precision: Precision) -> np.ndarray:
    """features [L, D] (any float dtype) -> the array the store writes."""
    if precision == "fp16":
        return features.astype(np.float16)
    values = features.astype(np.float32)
    absmax = np.abs(values).max(axis=1, keepdims=True)
    # the scale as fp16, rounded up where rounding made it smaller (the absmax must stay within 127 steps); the
    # codes are computed with that stored scale, so each decoded value is within half a step
    scale = (absmax / 127).astype(np.float16)
    scale = np.where(scale.astype(np.float32) * 127 < absmax, np.nextafter(scale, np.float16(np.inf)), scale)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)
    codes = np.clip(np.rint(values / safe), -127, 127).astype(np.int8)
    return np.concatenate([codes, scale.view(np.int8)], axis=1)


def checked_stored(features: np.ndarray, precision: Precision) -> np.ndarray:
    """`to_stored`, refused with a ValueError where the store cannot hold the features: NaN, inf, or values past
    fp16's 65504 (which it would hold as inf, and training read as a NaN loss)."""
    stored = to_stored(features, precision)
    if not np.isfinite(from_stored(stored, precision)).all():
        raise ValueError(f"the encoder's features hold NaN or inf, or values past {precision}'s range (largest "
                         f"|value| {float(np.abs(features).max()):.4g})")
    return stored


def from_stored(stored: np.ndarray, precision: Precision) -> np.ndarray:
    """The stored array -> features [L, D]."""
    if precision == "fp16":
        return stored
    codes, scale = stored[:, :-2], np.ascontiguousarray(stored[:, -2:]).view(np.float16)
    return codes.astype(np.float32) * scale.astype(np.float32)
