"""The training side of the feature cache: a complete entry's samples, split across Ray Train workers by
shard, shuffled with a seed, read ahead on background threads, each shard checked against the manifest's sha256
before it is decoded."""

import hashlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from itertools import count, tee

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

    def over_length(self, max_length: int, compressed=lambda n: n) -> list[dict] | None:
        """{"key", "tokens"} of every sample whose text tokens plus its items' `compressed` feature lengths exceed
        `max_length`, from the manifest alone; None for a cache encoded before lengths were recorded."""
        if any(shard.get("lengths") is None for shard in self.shards):
            return None
        over = []
        for shard in self.shards:
            for key, (text, items) in zip(shard["keys"], shard["lengths"]):
                tokens = text + sum(compressed(n) for n in items)
                if tokens > max_length:
                    over.append({"key": key, "tokens": tokens})
        return over

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

    def windows(self, order: list[int], size: int) -> list[tuple[int, list[int]]]:
        """`order`'s shards grouped into runs of consecutive shards holding at least `size` samples (the last may
        hold fewer), each with the position of its first sample in the epoch."""
        windows, first, members, held = [], 0, [], 0
        for index in order:
            members.append(index)
            held += self.shards[index]["count"]
            if held >= size:
                windows.append((first, members))
                first, members, held = first + held, [], 0
        if members:
            windows.append((first, members))
        return windows

    def read_ahead(self, indices: Iterator[int], threads: int, ahead: int) -> Iterator[list[dict]]:
        """The decoded shards `indices`, in order. With `threads`, shards holding at least `ahead` samples beyond
        the one handed out are being read, checked and decoded on background threads, so the consumer waits on
        storage only when it outruns them; with 0, each is read when asked for."""
        if threads == 0:
            yield from map(self.read_shard, indices)
            return
        pool, pending = ThreadPoolExecutor(threads, thread_name_prefix="shard-reader"), deque()

        def fill():
            while not pending or sum(count for count, _ in pending) < ahead:
                index = next(indices, None)
                if index is None:
                    return
                pending.append((self.shards[index]["count"], pool.submit(self.read_shard, index)))

        try:
            fill()
            while pending:
                samples = pending.popleft()[1].result()
                fill()
                yield samples
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def plan(self, rank: int, world: int, seed: int, epoch: int, start: int, epochs: int | None, shuffle: bool,
             window: int) -> Iterator[tuple[int, int, list[int], int, int]]:
        """(epoch, window, shards, first sample to yield, end) for each window to read, from `start` of `epoch`
        on, for `epochs` epochs (None: endless)."""
        quota = self.samples_per_worker(world)
        if not 0 <= start <= quota:
            raise ValueError(f"{self.uri}: start {start} is outside an epoch's {quota} samples per worker")
        for e in count(epoch) if epochs is None else range(epoch, epoch + epochs):
            order = self.worker_shards(rank, world)
            if shuffle:
                np.random.default_rng([seed, e, rank]).shuffle(order)
            for w, (first, members) in enumerate(self.windows(order, window)):
                skip = start - first if e == epoch else 0
                held = sum(self.shards[i]["count"] for i in members)
                if first < quota and skip < held:
                    yield e, w, members, max(skip, 0), quota - first

    def iter_samples(self, rank: int = 0, world: int = 1, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                     window: int = 1024, start: int = 0, epochs: int | None = 1, prefetch: int = 4) -> Iterator[dict]:
        """This rank's samples from its sample `start` of `epoch` on, for `epochs` epochs (None: endless): each
        epoch's shard order shuffled per (seed, epoch, rank), then the samples of each window of consecutive shards
        (at least `window` samples) permuted together. Because the order is fixed by the seed alone, a position is
        a plain count, and starting at `start` reads no shard before the window that holds it (a resumed run
        does not replay its data). `prefetch` threads read the next window while this one is consumed."""
        windows, reading = tee(self.plan(rank, world, seed, epoch, start, epochs, shuffle, window))
        shard_order = (i for _, _, members, _, _ in reading for i in members)
        with closing(self.read_ahead(shard_order, prefetch, window)) as shards:
            for e, w, members, skip, end in windows:
                samples = [sample for _ in members for sample in next(shards)]
                if shuffle:
                    permutation = np.random.default_rng([seed, e, rank, w]).permutation(len(samples))
                    samples = [samples[i] for i in permutation]
                yield from samples[skip:end]
