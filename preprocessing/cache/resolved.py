"""Which entry a series encode config made, found again without reading its data.

An entry's key covers every window's values, so finding it means reading and cutting the whole dataset: ~0.9 ms a
window in the driver (benchmarks/RESULTS.md, "Series encode"), days for GIFT-Eval's pretraining set, before every
training phase and evaluation that names the encode YAML. A run that writes or finds an entry records it under
`<cache root>/resolved/` with what it read: each file's size and modification time, from one listing. The same
config finds the entry again from one listing while no file changed. The record's name digests the config, less what
changes no sample (the run section, `max_windows`, `each_folder`), and the source of the code that cuts windows, so
that an edit to either reads the data again.
"""

import hashlib
import json
from types import ModuleType

from .. import storage
from .entry import CacheEntry, canonical_json

RESOLVED_FOLDER = "resolved"
CHANGE_NO_WINDOW = ("max_windows", "each_folder")


def source_digest(modules: list[ModuleType]) -> str:
    """sha256 over the source files of the modules that decide a sample."""
    digest = hashlib.sha256()
    for module in modules:
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def files_read(path: str) -> dict[str, list[int]] | None:
    """{file relative to `path` ("" for a file): [size, modification time in ns]}; None when there is nothing."""
    if storage.is_folder(path):
        return {name: list(stat) for name, stat in storage.list_tree(path).items()}
    stat = storage.stat_files([path])[path]
    return None if stat is None else {"": list(stat)}


class Resolution:
    """The record of one config: `find()` its entry while its files are unchanged, `write(uri)` once it has one."""

    def __init__(self, sections: dict, code: str):
        dataset = {k: v for k, v in sections["dataset"].items() if k not in CHANGE_NO_WINDOW}
        dataset["path"] = dataset["path"].rstrip("/")
        named = {**{k: v for k, v in sections.items() if k != "run"}, "dataset": dataset, "code": code}
        name = hashlib.sha256(canonical_json(named)).hexdigest()[:32]
        self.uri = storage.join(sections["cache"]["root"], RESOLVED_FOLDER, f"{name}.json")
        self.files = files_read(dataset["path"])  # before the read: a file changed meanwhile reads again next time

    def find(self) -> str | None:
        if self.files is None or not storage.exists(self.uri):
            return None
        record = json.loads(storage.read_bytes(self.uri))
        if record["files"] != self.files or not CacheEntry(record["entry"]).is_complete():
            return None
        return record["entry"]

    def write(self, entry_uri: str) -> None:
        if self.files is not None:
            storage.write_atomic(self.uri, json.dumps({"entry": entry_uri, "files": self.files}).encode())
