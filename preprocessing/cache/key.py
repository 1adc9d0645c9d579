"""What the cache is keyed on. A feature store is keyed on the encoder (kind, dtype, input size, the chosen layer,
a hash of its weight files) and the validation limits; each of its items on the bytes of one media file (or one series
window). A cache entry, the samples table, is keyed on its store, the dataset options that change a sample, the
shard size and every sample's record with the content hashes of its media. `entry_uri` names the entry by that
key (`cache_id`): an edited prompt makes a new entry whose features all come from the store.

Content hashes come from `storage.Fingerprints` with its records in `<cache root>/fingerprints/`: a file is read
again only when its size or modification time changes, so a start on unchanged data reads no media bytes.
"""

import hashlib
import json
import posixpath
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

from .. import storage
from .entry import canonical_json, cache_id
from .precision import DEFAULT, Precision

FINGERPRINTS_FOLDER = "fingerprints"
# where the files are, the permission to read outside the media root, the bound on a job's windows and a collection
# split into a job per folder change no sample: the samples they admit are in the samples' records
CHANGE_NO_SAMPLE = ("path", "media_root", "allow_media_outside_root", "max_windows", "each_folder")
WEIGHT_FILES = (".safetensors", ".bin", ".json")


def hash_model_dir(model_dir, fingerprints: storage.Fingerprints | None = None) -> str:
    """sha256 over the names and contents of a model directory's weight and config files, a folder or an s3://
    URI alike (with `fingerprints`, the files are read only when they changed since they were last
    fingerprinted)."""
    names = [n for n in storage.list_files(str(model_dir)) if posixpath.splitext(n)[1] in WEIGHT_FILES]
    if not names:
        raise FileNotFoundError(f"{model_dir}: no weight or config files")
    files = {n: storage.join(str(model_dir), n) for n in names}
    digests = fingerprints.sha256s(list(files.values())) if fingerprints else {
        f: storage.file_sha256(f) for f in files.values()}
    return hashlib.sha256(canonical_json([[n, digests[files[n]]] for n in names])).hexdigest()


# an encoder kind whose features our code changed for the same weights joins the key with its revision, so that a
# store of the old features is never reused for the new (the whole kind's: a change to Base's features re-encodes
# Large too). wavlm 2: Base/Base+ clips encoded alone (before, a padded clip's GroupNorm took in its batch-mates'
# padding); 3: the samples as the checkpoint's feature extractor gives them (Base/Base+ ship do_normalize false;
# before, always normalised), both 2026-12-05. Every vision kind 2: images turned upright by their EXIF orientation
# and transparency laid on white (before, dropped: black), 2026-12-06 (the day the default pixel limit went from 4096²
# to 8192², which re-keyed the image stores too). Every series kind 2, "raw" too: windows z-scored in float64 (before,
# cast to float32 first, which rounds away the movement of a series at a high level), 2026-12-06
FEATURE_REVISIONS = {"wavlm": 3, "clip": 2, "siglip": 2, "siglip2": 2, "dinov2": 2, "raw": 2, "fracast": 2, "timer": 2}


def store_key(modality: str, encoder: dict, limits: dict, fingerprints: storage.Fingerprints,
              precision: Precision = DEFAULT) -> dict:
    """encoder: the encode config's section as a dict (`kind`, `model_dir`, `dtype`, `image_size`, `layer`); limits:
    the validation limits (an item the store holds passed them); precision: how items are stored (`precision.py`)."""
    model_dir = encoder["model_dir"]
    # the layer and the precision join the key only when chosen: stores of the last hidden state in fp16 keep the
    # keys they were written under
    layer = {"layer": encoder["layer"]} if encoder.get("layer") is not None else {}
    stored = {"precision": precision} if precision != DEFAULT else {}
    revision = {"revision": FEATURE_REVISIONS[encoder["kind"]]} if encoder["kind"] in FEATURE_REVISIONS else {}
    return {"modality": modality, "kind": encoder["kind"], "dtype": encoder["dtype"],
            "image_size": encoder["image_size"], **layer, **stored, **revision,
            **processor_only_nested(encoder["kind"], model_dir), "limits": limits,
            "weights_hash": hash_model_dir(model_dir, fingerprints) if model_dir else None}


# the kinds whose features follow the folder's processor settings (`preprocessing/encoders/base.py`)
READS_PROCESSOR = ("clip", "siglip", "siglip2", "dinov2", "wavlm")


# where transformers 5's processor_config.json nests an image processor's or a feature extractor's settings
NESTED_PROCESSORS = ("image_processor", "feature_extractor")


def nests_processor_settings(data: bytes) -> bool:
    """Whether a processor_config.json holds an image processor's or feature extractor's settings (transformers 4's
    held a processor's own options only, which the encoders do not read)."""
    try:
        record = json.loads(data)
    except ValueError:
        return False
    return isinstance(record, dict) and any(isinstance(record.get(k), dict) for k in NESTED_PROCESSORS)


def processor_only_nested(kind: str, model_dir) -> dict:
    """{"processor_file": ...} for a folder whose processor settings only transformers 5's processor_config.json
    holds: until 2026-12-07 its items were encoded with the model's default processor, so its store is keyed apart
    from those (every other folder keeps its key)."""
    if kind not in READS_PROCESSOR or not model_dir:
        return {}
    names = set(storage.list_files(str(model_dir)))
    nested_only = ("processor_config.json" in names and "preprocessor_config.json" not in names
                   and nests_processor_settings(storage.read_bytes(storage.join(str(model_dir),
                                                                                "processor_config.json"))))
    return {"processor_file": "processor_config.json"} if nested_only else {}


# samples are laid into shards in the order of their keys' sha256 (`shard_order`): fixed by the keys, unrelated to
# them; entries from before 2026-12-07 had them in key order, and no such field in their spec
SHARD_ORDER = "sha256"


def shard_order(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def cache_spec(store: dict, dataset: dict, shard_size: int, records: Iterable[dict],
               rejected: Iterable[tuple[str | None, str]] = ()) -> dict:
    """store: its key; records: each sample's descriptor with the content hashes of its media, in key order;
    rejected: (key, reason) of each record refused before encoding. An entry's manifest counts what its run read and
    rejected, so a bad record added since names another entry (its shards written again, its items found in the
    store) rather than a hit whose counts and rejects.jsonl leave it out; an entry with none keeps the id it had."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(canonical_json(record))
    spec = {"modality": store["modality"], "store": store, "shard_size": shard_size, "shard_order": SHARD_ORDER,
            "dataset": {k: v for k, v in dataset.items() if k not in CHANGE_NO_SAMPLE},
            "samples_hash": digest.hexdigest()}
    refused = sorted((key or "", reason) for key, reason in rejected)
    if refused:
        spec["rejects_hash"] = hashlib.sha256(canonical_json(refused)).hexdigest()
    return spec


def cache_fingerprints(cache_root: str) -> storage.Fingerprints:
    return storage.Fingerprints(storage.join(cache_root, FINGERPRINTS_FOLDER))


def entry_uri(root: str, spec: dict) -> str:
    return storage.join(root, f"{spec['modality']}-{spec['store']['kind']}-{cache_id(spec)[:16]}")


def code_version() -> str:
    """The installed modrwkv version, recorded in each manifest (provenance, not part of the key)."""
    return version("modrwkv")


# the libraries that decode media and run the encoders: a new release may move features by rounding (a fused kernel,
# a resampler), so their versions are recorded with a store and each entry; not keyed, since re-encoding a
# store of millions of items on every patch release costs more than such a shift is worth (`run.force` re-encodes)
FEATURE_LIBRARIES = ("torch", "transformers", "numpy", "pillow", "soundfile", "scipy")


def library_versions() -> dict[str, str]:
    """The installed versions of `FEATURE_LIBRARIES` (those installed)."""
    found = {}
    for name in FEATURE_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
