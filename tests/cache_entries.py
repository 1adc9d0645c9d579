"""Cache entries written by hand, for tests of the readers: samples with "item<j>" arrays, stored the way the
encode job stores them (features in the store beside the entry, referenced by the samples)."""

import hashlib

from preprocessing import storage
from preprocessing.cache.entry import CacheEntry, FeatureStore, pack_shard

STORE = "image-test-0000000000000000"


def write_entry(uri: str, shards: list[list[dict]], modality: str = "image") -> dict:
    store, entry = FeatureStore(storage.parent(uri), STORE), CacheEntry(uri)
    for index, shard in enumerate(shards):
        rows = []
        for sample in shard:
            items = sorted(name for name in sample["arrays"] if name.startswith("item"))
            files = [store.write(hashlib.sha256(f"{sample['key']}/{name}".encode()).hexdigest(),
                                 sample["arrays"][name]) for name in items]
            arrays = {name: a for name, a in sample["arrays"].items() if name not in items}
            rows.append({"key": sample["key"], "arrays": arrays, "meta": {**sample["meta"], "features": files}})
        entry.write_shard(index, pack_shard(rows), [r["key"] for r in rows], [])
    return entry.finish({"modality": modality}, len(shards), [], n_read=sum(map(len, shards)),
                        extra={"feature_store": STORE})
