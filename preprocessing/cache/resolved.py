"""Which entry a series encode config made, found again without reading its data.

An entry's key covers every window's values, so finding it means reading and cutting the whole dataset: ~0.2 ms a
window in the driver (benchmarks/RESULTS.md, "Series encode"), some 14 hours for GIFT-Eval's pretraining set, before
every training phase and evaluation that names the encode YAML. A run that writes or finds an entry records it
under `<cache root>/resolved/` with the files it read, each one's size and modification time (the reader's own
selection, from one listing). The same description later finds the entry again from a listing while no such file
changed. The caller describes what decides the samples beyond the files (`pipelines/encode.py`
`series_resolution`: the dataset options that change a window, the store's key, the shard size, a digest of the code
that reads, cuts, checks and keys windows), so that an edit to any of them reads the data again.
"""

import hashlib
import json
from importlib.metadata import version
from types import ModuleType

from .. import storage
from .entry import CacheEntry, canonical_json

RESOLVED_FOLDER = "resolved"


def source_digest(modules: list[ModuleType], distributions: list[str]) -> str:
    """sha256 over the source files of the modules and the versions of the distributions that decide a sample."""
    digest = hashlib.sha256()
    for module in modules:
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    digest.update(canonical_json({name: version(name) for name in distributions}))
    return digest.hexdigest()


def read_record(uri: str) -> dict | None:
    """A record, {"entry": its URI, "files": ...}; None when it is gone or damaged (a run then reads the data again
    and writes it anew; `modrwkv cache gc` takes it for stale)."""
    try:
        record = json.loads(storage.read_bytes(uri))
    except (ValueError, FileNotFoundError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("entry"), str) and "files" in record else None


class Resolution:
    """One description's record: `find()` its entry while its files are unchanged, `write(uri)` once it has one.
    `files`: {name: [size, modification time in ns]} of what the reader reads; None: nothing to record."""

    def __init__(self, cache_root: str, described: dict, files: dict[str, list[int]] | None):
        name = hashlib.sha256(canonical_json(described)).hexdigest()[:32]
        self.uri, self.files = storage.join(cache_root, RESOLVED_FOLDER, f"{name}.json"), files

    def find(self) -> str | None:
        if self.files is None or not storage.exists(self.uri):
            return None
        record = read_record(self.uri)
        if record is None or record["files"] != self.files or not CacheEntry(record["entry"]).is_complete():
            return None
        return record["entry"]

    def write(self, entry_uri: str) -> None:
        if self.files is not None:
            storage.write_atomic(self.uri, json.dumps({"entry": entry_uri, "files": self.files}).encode())
