"""What a feature-cache entry is keyed on: the encoder (kind, dtype, input size, a hash of its weight files),
the preprocessing (limits, shard size, the dataset options that change features) and the bytes of every raw
input. `entry_uri` names the entry by that key (`cache_id`), so a changed encoder, config or dataset can never
pick up stale features."""

import dataclasses
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

from .. import storage
from ..readers import RawSample
from .entry import cache_id

# where the files are, and the permission to read outside the media root, change no feature: the samples they
# admit are in the source hash
LOCATION_ONLY = ("path", "media_root", "allow_media_outside_root")


def hash_model_dir(model_dir) -> str:
    """sha256 over the weight and config files of a model directory (what a feature cache must be keyed on)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight or config files")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(uri: str) -> str:
    try:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    except (FileNotFoundError, OSError):
        return "missing"  # the validate stage rejects it with the reason


def source_hash(samples: list[RawSample]) -> str:
    """Descriptors and the bytes of every raw file: edited data never reuses a stale cache."""
    files = sorted({src for s in samples for src in s.sources})
    with ThreadPoolExecutor(8) as pool:
        contents = dict(zip(files, pool.map(file_sha256, files)))
    digest = hashlib.sha256()
    for s in samples:
        record = {**dataclasses.asdict(s), "content": [contents[src] for src in s.sources]}
        digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()


def cache_spec(modality: str, encoder: dict, dataset: dict, limits: dict, shard_size: int,
               samples: list[RawSample]) -> dict:
    """encoder, dataset, limits: the encode config's sections as dicts (`kind`, `model_dir`, `dtype`,
    `image_size`; the dataset options; the validation limits)."""
    preprocessing = {"limits": limits, "shard_size": shard_size,
                     "dataset": {k: v for k, v in dataset.items() if k not in LOCATION_ONLY}}
    model_dir = encoder["model_dir"]
    return {"modality": modality,
            "encoder": {"kind": encoder["kind"], "dtype": encoder["dtype"], "image_size": encoder["image_size"],
                        "weights_hash": hash_model_dir(model_dir) if model_dir else None},
            "preprocessing": preprocessing, "source_hash": source_hash(samples)}


def entry_uri(root: str, spec: dict) -> str:
    return storage.join(root, f"{spec['modality']}-{spec['encoder']['kind']}-{cache_id(spec)[:16]}")


def code_version() -> str:
    """The installed modrwkv version, recorded in each manifest (provenance, not part of the key)."""
    return version("modrwkv")
