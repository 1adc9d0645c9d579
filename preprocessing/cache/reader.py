"""The training side of the feature cache: a complete entry's samples, split across Ray Train workers by
shard, shuffled with a seed, each shard checked against the manifest's sha256 before it is decoded."""

import hashlib
from collections.abc import Iterator

import numpy as np

from .. import storage
from .entry import CacheEntry
from .shard import unpack_shard


class FeatureCache:
    def __init__(self, uri: str):
        self.uri = str(uri)
        self.manifest = CacheEntry(self.uri).manifest()
        self.shards = self.manifest["shards"]

    @property
    def id(self) -> str:
        return self.manifest["cache_id"]

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    def __len__(self) -> int:
        return self.manifest["counts"]["written"]

    def read_shard(self, index: int) -> list[dict]:
        shard = self.shards[index]
        data = storage.read_bytes(storage.join(self.uri, shard["name"]))
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ValueError(f"{self.uri}/{shard['name']}: sha256 differs from the manifest; the shard was changed "
                             "or damaged after encoding (re-encode with --force)")
        return unpack_shard(data, f"{self.uri}/{shard['name']}")

    def worker_shards(self, rank: int, world: int) -> list[int]:
        return list(range(rank, len(self.shards), world))

    def samples_per_worker(self, world: int) -> int:
        """Every rank yields this many samples (the smallest rank's share), so all ranks take the same number
        of steps: a distributed step needs every rank."""
        if len(self.shards) < world:
            raise ValueError(f"{self.uri}: {len(self.shards)} shards for {world} workers; encode with a smaller "
                             "cache.shard_size so every worker gets at least one shard")
        return min(sum(self.shards[i]["count"] for i in self.worker_shards(r, world)) for r in range(world))

    def iter_samples(self, rank: int = 0, world: int = 1, seed: int = 0, epoch: int = 0,
                     shuffle: bool = True, buffer_size: int = 1024) -> Iterator[dict]:
        """This rank's samples: shard order shuffled per (seed, epoch), then a shuffle buffer across shards."""
        rng = np.random.default_rng([seed, epoch, rank])
        order = self.worker_shards(rank, world)
        if shuffle:
            rng.shuffle(order)
        quota, buffer = self.samples_per_worker(world), []
        for index in order:
            for sample in self.read_shard(index):
                if not shuffle:
                    yield sample
                    quota -= 1
                    if quota == 0:
                        return
                    continue
                buffer.append(sample)
                if len(buffer) >= buffer_size:
                    yield buffer.pop(rng.integers(len(buffer)))
                    quota -= 1
                    if quota == 0:
                        return
        while buffer and quota > 0:
            yield buffer.pop(rng.integers(len(buffer)))
            quota -= 1
