"""A feature-cache entry: `shard-NNNNN.tar` shards, a `shard-NNNNN.json` receipt per finished shard, then
`rejects.jsonl` and `manifest.json`, written last. Its folder name is content-addressed by everything the
features depend on (encoder id and weights hash, preprocessing config, source-dataset hash, format version),
so a changed encoder or config can never pick up stale features.

A shard counts as done only when its receipt exists (the tar is moved into place first); an interrupted job
resumes by encoding the shards that have no receipt."""

import hashlib
import json

from .. import storage

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cache_id(spec: dict) -> str:
    return hashlib.sha256(canonical_json({"format_version": FORMAT_VERSION, **spec})).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def receipt_name(index: int) -> str:
    return f"shard-{index:05d}.json"


class CacheEntry:
    def __init__(self, uri: str):
        self.uri = str(uri)

    def path(self, name: str) -> str:
        return storage.join(self.uri, name)

    def is_complete(self) -> bool:
        return storage.exists(self.path(MANIFEST))

    def manifest(self) -> dict:
        if not self.is_complete():
            raise FileNotFoundError(f"{self.uri}: no {MANIFEST}; the cache entry is missing or was never finished")
        return json.loads(storage.read_bytes(self.path(MANIFEST)))

    def done_shards(self) -> set[int]:
        return {int(n[len("shard-"):-len(".json")]) for n in storage.list_files(self.uri)
                if n.startswith("shard-") and n.endswith(".json")}

    def write_shard(self, index: int, shard: bytes, keys: list[str], rejects: list[dict],
                    lengths: list[list] | None = None) -> dict:
        """lengths: per key, [text tokens, [tokens of each feature item]], so a context length can be checked
        against the whole cache from its manifest alone."""
        receipt = {"index": index, "name": shard_name(index), "count": len(keys), "keys": keys,
                   "sha256": hashlib.sha256(shard).hexdigest(), "bytes": len(shard), "rejects": rejects,
                   "lengths": lengths}
        storage.write_atomic(self.path(shard_name(index)), shard)
        storage.write_atomic(self.path(receipt_name(index)), canonical_json(receipt))
        return receipt

    def receipt(self, index: int) -> dict:
        return json.loads(storage.read_bytes(self.path(receipt_name(index))))

    def clear(self) -> None:
        """Forgets a previous encode: manifest first, so the entry stops counting as complete at once."""
        for name in [MANIFEST, REJECTS] + [n for n in storage.list_files(self.uri) if n.startswith("shard-")]:
            storage.delete(self.path(name))

    def finish(self, spec: dict, n_shards: int, read_rejects: list[dict], n_read: int, extra: dict) -> dict:
        """Gathers the receipts into rejects.jsonl and the manifest (written last); every sample read must be
        either written or rejected."""
        receipts = [self.receipt(i) for i in range(n_shards)]
        rejects = read_rejects + [r for rec in receipts for r in rec["rejects"]]
        written = sum(r["count"] for r in receipts)
        if written + len(rejects) != n_read:
            raise RuntimeError(f"{self.uri}: read {n_read} samples but wrote {written} and rejected {len(rejects)}")
        manifest = {
            "format_version": FORMAT_VERSION, "cache_id": cache_id(spec), **spec, **extra,
            "counts": {"read": n_read, "written": written, "rejected": len(rejects)},
            "shards": [{k: r.get(k) for k in ("name", "count", "sha256", "bytes", "keys", "lengths")} for r in receipts],
        }
        storage.write_atomic(self.path(REJECTS), b"".join(canonical_json(r) + b"\n" for r in rejects))
        storage.write_atomic(self.path(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest
