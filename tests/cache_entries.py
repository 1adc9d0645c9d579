"""Cache entries written by hand, for tests of the readers: samples with their items' features, stored the way the
encode job stores them (features in the store beside the entry, referenced by the samples)."""

import dataclasses
import hashlib

from modrwkv.conversation import Sample
from preprocessing import storage
from preprocessing.cache.entry import CacheEntry, FeatureStore, pack_shard

STORE = "image-test-0000000000000000"


def write_entry(uri: str, shards: list[list[Sample]], modality: str = "image", encoder: dict | None = None) -> dict:
    """encoder: the store key (encoder settings) the manifest records, as an encode job's does; none without it."""
    store, entry = FeatureStore(storage.parent(uri), STORE), CacheEntry(uri)
    for index, shard in enumerate(shards):
        rows = [dataclasses.replace(sample, item_files=[
            store.write(hashlib.sha256(f"{sample.key}/item{j}".encode()).hexdigest(), features)
            for j, features in enumerate(sample.items)]) for sample in shard]
        # lengths as the manifest records them, [text tokens, [feature vectors of each item]]; these hand-made
        # samples need not tokenize, and no test here checks a context length, so the text counts 0
        entry.write_shard(index, pack_shard(rows), [r.key for r in rows], [],
                          [[0, [len(a) for a in r.items]] for r in rows], [r.item_files for r in rows])
    spec = {"modality": modality, **({"store": encoder} if encoder else {})}
    return entry.finish(spec, len(shards), [], n_read=sum(map(len, shards)),
                        extra={"feature_store": STORE})
