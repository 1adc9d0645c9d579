"""sha256 of raw files and encoder weights, read again only when a file changes: for each folder, its files'
(size, modification time, sha256) are recorded in `<cache root>/fingerprints/<hash of the folder's URI>.json`,
and a file whose size and modification time match its record is not read. (Like make and git, this trusts that a
rewrite changes the modification time or the size.) A start on unchanged data therefore lists folders and reads
no media bytes; on S3 a listing costs one request per 1,000 files."""

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

from .. import storage

FOLDER = "fingerprints"


def file_sha256(uri: str) -> str | None:
    try:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    except (FileNotFoundError, OSError):  # gone since it was listed
        return None


class Fingerprints:
    def __init__(self, cache_root: str):
        self.root = storage.join(cache_root, FOLDER)
        self.files_read = 0  # how many files the last calls had to hash (a benchmark and test reading)

    def record_uri(self, folder: str) -> str:
        return storage.join(self.root, hashlib.sha256(str(folder).encode()).hexdigest()[:32] + ".json")

    def sha256s(self, uris: list[str]) -> dict[str, str | None]:
        """uri -> the sha256 of its bytes, or None when there is no such file."""
        stats = storage.stat_files(sorted(set(uris)))
        by_folder: dict[str, list[str]] = {}
        for uri in stats:
            by_folder.setdefault(storage.parent(uri), []).append(uri)
        digests = {}
        for folder, members in by_folder.items():
            record_uri = self.record_uri(folder)
            record = json.loads(storage.read_bytes(record_uri)) if storage.exists(record_uri) else {}
            changed = []
            for uri in members:
                name, stat = posixpath.basename(str(uri)), stats[uri]
                known = record.get(name)
                if stat is None:
                    digests[uri] = None
                elif known and (known[0], known[1]) == stat:
                    digests[uri] = known[2]
                else:
                    changed.append(uri)
            if changed:
                with ThreadPoolExecutor(8) as pool:
                    for uri, digest in zip(changed, pool.map(file_sha256, changed)):
                        digests[uri] = digest
                        if digest is not None:
                            record[posixpath.basename(str(uri))] = [*stats[uri], digest]
                self.files_read += len(changed)
                storage.write_atomic(record_uri, json.dumps(record, sort_keys=True).encode())
        return digests
