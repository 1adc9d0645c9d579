"""A cached sample: what the encode job writes into a cache entry and what training and evaluation read back. Its
layout in a shard is defined here alone (`to_shard_record`, `from_shard_record`); the tar container, the byte
coding and the checks are the cache's (`preprocessing/cache/entry.py`).

    <key>.json          turns, "modality", "features" (its item files in the feature store, in placeholder order)
                        and the provenance beside them (id, source, language, series mean/std, content_sha256)
    <key>.lookback.npy  series: the normalised lookback
    <key>.target.npy    series: the normalised horizon
"""

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .conversation import Turn
from .multimodal import Features

SERIES_ARRAYS = ("lookback", "target")


@dataclass
class Sample:
    key: str
    modality: str  # image | audio | series: its items', and the projector that reads them
    turns: list[Turn]
    item_files: list[str] = field(default_factory=list)  # its items in the feature store, in placeholder order
    items: list[np.ndarray] = field(default_factory=list)  # their features, once read from the store
    lookback: np.ndarray | None = None  # series windows: the normalised lookback, for the forecast skip and baselines
    target: np.ndarray | None = None  # series windows: the normalised horizon
    meta: dict = field(default_factory=dict)  # json-able provenance and extras: id, source, language, mean, std

    def to_shard_record(self) -> dict:
        """{"__key__", "json": the .json member's document, "<name>.npy": array}: a WebDataset sample, which is what
        a shard stores. The features stay in the store: only their names are written."""
        document = {**self.meta, "turns": [asdict(t) for t in self.turns], "modality": self.modality,
                    "features": self.item_files}
        arrays = {f"{name}.npy": getattr(self, name) for name in SERIES_ARRAYS if getattr(self, name) is not None}
        return {"__key__": self.key, "json": document, **arrays}

    @classmethod
    def from_shard_record(cls, record: dict) -> "Sample":
        """The sample of a record `to_shard_record` wrote (its items not read yet)."""
        meta = dict(record["json"])
        turns, modality, files = (meta.pop(k) for k in ("turns", "modality", "features"))
        unknown = set(record) - {"__key__", "json"} - {f"{name}.npy" for name in SERIES_ARRAYS}
        if unknown:
            raise ValueError(f"sample {record['__key__']!r}: unknown members {sorted(unknown)}")
        return cls(record["__key__"], modality, [Turn(**t) for t in turns], files,
                   lookback=record.get("lookback.npy"), target=record.get("target.npy"), meta=meta)

    def text(self, role: str) -> str:
        """The first `role` turn's text: the question ("user") or the reference answer ("assistant")."""
        return next(t.text for t in self.turns if t.role == role)

    def features(self) -> Features:
        """Its items as the model takes them: (modality, float tensor) pairs, in placeholder order."""
        return [(self.modality, torch.from_numpy(a).float()) for a in self.items]
