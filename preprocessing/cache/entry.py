"""The feature cache's one on-disk format: the feature store, which holds each media item's features once per
encoder, and cache entries, the samples tables that reference them. The encode job writes both (`FeatureStore`,
`CacheEntry`); training and evaluation read an entry with its features (`FeatureCache`).

    <cache root>/features/<modality>-<encoder kind>-<16 hex of the store key>/
        store.json                                  the store's key: encoder, its weights hash, validation limits;
                                                    and the library versions of the job that made it
        <ref[:2]>/<ref>_<length>_<sha256[:32]>.npy  one item: ref = sha256 of the media file's bytes (or of the
                                                    normalised series window); length = its feature vectors; the
                                                    digest is of the .npy bytes, checked on every read
    <cache root>/<modality>-<encoder kind>-<16 hex of the entry key>/
        shard-NNNNN.tar, shard-NNNNN.json           samples: a WebDataset tar of each `Sample`'s members
                                                    (`modrwkv/batching.py`: `<key>.json` with turns, provenance and
                                                    its item files; series arrays as `<key>.<name>.npy`); a
                                                    receipt each
        index.parquet, rejects.jsonl, manifest.json written last: per sample its shard, key, lengths and item
                                                    files (`index.py`); the rejects; counts, shards with sha256

A store is shared by every dataset, split, prompt edit and experiment that uses its items; item names carry all
the encode job and the readers need, so one listing tells which items exist and how long they are. An entry is
cheap: rebuilding one for edited text reads no media and runs no encoder. Writes are atomic and
content-addressed: two jobs encoding the same new item write the same name (a deterministic encoder gives the
same bytes), never a half-written file. Shards are deterministic (members in sample order, mtime 0, uid 0);
reading never unpickles (np.load with allow_pickle=False) and checks every shard and item against its sha256.
The reader splits an entry's samples across Ray Train workers by shard (by sample when it has too few shards to go
round), shuffles them with a seed and reads ahead on background threads."""

import hashlib
import io
import json
import re
import tarfile
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from itertools import count, tee
from typing import NamedTuple

import numpy as np

from modrwkv.conversation import Sample

from .. import storage
from .index import INDEX, from_manifest, index_table, item_sums, read_index, total_tokens, write_index
from .precision import DEFAULT, Precision, from_stored, key_precision

# 3: per-sample keys, lengths and item files in index.parquet; 2 kept keys and lengths in the manifest (read alike);
# 1 held the features inside the shards, before the feature store
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
STORE_FOLDER = "features"
STORE_KEY_FILE = "store.json"
WRITTEN_WITH = "written_with"  # in store.json beside the key: provenance, not part of it
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cache_id(spec: dict) -> str:
    return hashlib.sha256(canonical_json({"format_version": FORMAT_VERSION, **spec})).hexdigest()


def entry_name(uri: str) -> str:
    """An entry's folder name, `<modality>-<encoder kind>-<16 hex of the entry key>`: what names it in runs and
    records."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def receipt_name(index: int) -> str:
    return f"shard-{index:05d}.json"



def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# numpy parses a .npy header with `ast`, which CPython before 3.11.8 cannot run in two threads at once (gh-106905:
# a rare "SystemError: AST constructor recursion depth mismatch"); the readers' threads take turns
_NPY_HEADER = threading.Lock()


def load_npy(data: bytes) -> np.ndarray:
    """A .npy file's array, never unpickled, safe to call from many threads."""
    with _NPY_HEADER:
        return np.load(io.BytesIO(data), allow_pickle=False)


def pack_shard(samples: list[Sample]) -> bytes:
    """The samples' records (`Sample.to_shard_record`) as a WebDataset tar, written in the given order."""
    out = io.BytesIO()
    # PAX: a member name over USTAR's 100 characters (a long sample key) gets an extended header; every other
    # member is written byte for byte as USTAR writes it, so the shards of earlier encodes are unchanged
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            record = sample.to_shard_record()
            members = [(name, npy_bytes(record[name])) for name in sorted(record) if name.endswith(".npy")]
            members.append(("json", json.dumps(record["json"], sort_keys=True, ensure_ascii=False).encode()))
            for suffix, data in members:
                info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def unpack_shard(data: bytes, name: str = "shard") -> list[Sample]:
    """The samples of a shard, in order, without their items' features."""
    records: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            payload = tar.extractfile(member).read()
            record = records.setdefault(key, {"__key__": key})
            if suffix == "json":
                record["json"] = json.loads(payload)
            elif suffix.endswith(".npy"):
                record[suffix] = load_npy(payload)
            else:
                raise ValueError(f"{name}: member {member.name!r} is neither .npy nor .json")
    for key, record in records.items():
        if "json" not in record:
            raise ValueError(f"{name}: sample {key!r} has no .json member")
    try:
        return [Sample.from_shard_record(record) for record in records.values()]
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


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
        return storage.read_json(self.path(MANIFEST))

    def done_shards(self) -> dict[int, dict]:
        """The receipts of the shards a previous, interrupted run wrote, by index, each beside a shard of its size
        (a receipt from before the index, without item files, or a damaged one is left out: written again)."""
        receipts = {}
        for index in self.shard_indices("json"):
            try:
                receipts[index] = self.receipt(index)
            except ValueError as e:  # the crash that interrupted the run cut its write short
                print(f"note: {e}; its shard is written again")
        shards = storage.stat_files([self.path(shard_name(index)) for index in receipts])
        return {index: receipt for index, receipt in receipts.items() if "item_files" in receipt
                and (shards[self.path(shard_name(index))] or (None,))[0] == receipt["bytes"]}

    def shard_indices(self, suffixes: str) -> set[int]:
        """The numbers of the shard files (`suffixes`: "tar", "json" or "tar|json") the entry's folder holds."""
        return {int(match[1]) for n in storage.list_files(self.uri)
                if (match := re.fullmatch(rf"shard-(\d+)\.({suffixes})", n))}

    def write_shard(self, index: int, shard: bytes, keys: list[str], rejects: list[dict],
                    lengths: list[list], item_files: list[list[str]]) -> dict:
        """Per key: lengths, [text tokens, [tokens of each feature item]], and its item files, for the entry's
        index (a context length is checked against the whole cache, and store items found in use, from it alone)."""
        receipt = {"index": index, "name": shard_name(index), "count": len(keys), "keys": keys,
                   "sha256": hashlib.sha256(shard).hexdigest(), "bytes": len(shard), "rejects": rejects,
                   "lengths": lengths, "item_files": item_files}
        # an older run's receipt first: a crash between the two writes must not leave it beside other bytes
        storage.delete(self.path(receipt_name(index)))
        storage.write_atomic(self.path(shard_name(index)), shard)
        storage.write_atomic(self.path(receipt_name(index)), canonical_json(receipt))
        return receipt

    def delete_shards_from(self, first: int) -> None:
        """Removes every shard (and receipt) numbered `first` or more: an earlier run's past this one's last, whether
        its receipt was found whole or not."""
        for index in sorted(i for i in self.shard_indices("tar|json") if i >= first):
            storage.delete(self.path(receipt_name(index)))  # first: a shard without its receipt is never reused
            storage.delete(self.path(shard_name(index)))

    def receipt(self, index: int) -> dict:
        return storage.read_json(self.path(receipt_name(index)))

    def clear(self) -> None:
        """Forgets a previous encode: manifest first, so the entry stops counting as complete at once."""
        for name in [MANIFEST, REJECTS, INDEX] + [n for n in storage.list_files(self.uri) if n.startswith("shard-")]:
            storage.delete(self.path(name))

    def finish(self, spec: dict, n_shards: int, read_rejects: list[dict], n_read: int, extra: dict) -> dict:
        """Gathers the receipts into the index, rejects.jsonl and the manifest (written last); every sample read
        must be either written or rejected."""
        receipts = [self.receipt(i) for i in range(n_shards)]
        rejects = read_rejects + [r for rec in receipts for r in rec["rejects"]]
        written = sum(r["count"] for r in receipts)
        if written + len(rejects) != n_read:
            raise RuntimeError(f"{self.uri}: read {n_read} samples but wrote {written} and rejected {len(rejects)}")
        manifest = {
            "format_version": FORMAT_VERSION, "cache_id": cache_id(spec), **spec, **extra,
            "counts": {"read": n_read, "written": written, "rejected": len(rejects)},
            "shards": [{k: r[k] for k in ("name", "count", "sha256", "bytes")} for r in receipts],
        }
        write_index(self.uri, index_table(receipts))
        storage.write_atomic(self.path(REJECTS), b"".join(canonical_json(r) + b"\n" for r in rejects))
        storage.write_atomic(self.path(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest


def item_file(ref: str, data: bytes, length: int) -> str:
    return f"{ref[:2]}/{ref}_{length}_{hashlib.sha256(data).hexdigest()[:32]}.npy"


# `item_file`'s names: what a store reads or copies is one of its own items, never a path out of it (`../x.npy`)
ITEM_FILE = re.compile(r"([0-9a-f]{2})/(\1[0-9a-f]{62})_(\d+)_([0-9a-f]{32})\.npy")


def parse_item_file(name: str) -> tuple[str, int, str]:
    """(ref, length, digest) of an item file's relative name; ValueError for a name `item_file` never makes (an
    index or shard naming it was damaged or made by hand)."""
    match = ITEM_FILE.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not the name of a feature store's item (xx/<sha256>_<length>_<digest>.npy)")
    return match[2], int(match[3]), match[4]


def item_length(name: str) -> int:
    return parse_item_file(name)[1]


def store_name(key: dict) -> str:
    return f"{key['modality']}-{key['kind']}-{hashlib.sha256(canonical_json(key)).hexdigest()[:16]}"


class FeatureStore:
    def __init__(self, root: str, name: str, precision: Precision = DEFAULT):
        self.uri = storage.join(root, STORE_FOLDER, name)
        self.name, self.precision = name, precision

    @classmethod
    def for_key(cls, root: str, key: dict, written_with: dict[str, str] | None = None) -> "FeatureStore":
        """The store of `key`, made if new: its store.json holds the key and `written_with` (the library versions
        of its first writer, `key.library_versions`)."""
        store = cls(root, store_name(key), key_precision(key))
        if not storage.exists(storage.join(store.uri, STORE_KEY_FILE)):
            key_file = storage.join(store.uri, STORE_KEY_FILE)
            record = {**key, WRITTEN_WITH: written_with} if written_with else key
            storage.write_atomic(key_file, json.dumps(record, indent=1, sort_keys=True).encode())
        return store

    def key(self) -> dict:
        """The store key it was made for (`for_key`), with `WRITTEN_WITH` where recorded; {} for a store that
        records none."""
        try:  # one request, not a look then a read
            return storage.read_json(storage.join(self.uri, STORE_KEY_FILE))
        except FileNotFoundError:
            return {}

    def items(self) -> dict[str, str]:
        """ref -> its item file (relative), for every item the store holds: one listing, nothing read. A ref held
        twice (`run.force` encoded it again into other bytes, another library's rounding, while entries still name
        the old file): the newer file, as the forced job wrote it."""
        listed = sorted(storage.list_tree(self.uri).items(), key=lambda file: (file[1][1], file[0]))  # by mtime
        return {match[2]: name for name, _ in listed if (match := ITEM_FILE.fullmatch(name))}

    def write(self, ref: str, features: np.ndarray) -> str:
        """Stores one item's features as given (`precision.to_stored` made them); returns its file name (relative)."""
        data = npy_bytes(features)
        name = item_file(ref, data, len(features))
        storage.write_atomic(storage.join(self.uri, name), data)
        return name

    def read(self, name: str) -> np.ndarray:
        """One item's features, checked against the digest in its name; never unpickled; int8 ones decoded."""
        digest = parse_item_file(name)[2]  # before anything is read: a name out of the store is refused
        data = storage.read_bytes(storage.join(self.uri, name))
        if not hashlib.sha256(data).hexdigest().startswith(digest):
            raise ValueError(f"{self.uri}/{name}: sha256 differs from its name; the features were changed or "
                             "damaged after encoding (delete the file and encode again)")
        return from_stored(load_npy(data), self.precision)


class Share(NamedTuple):
    """Samples `first`, `first + step`, ... of shard `shard`: `count` of them."""
    shard: int
    first: int
    step: int
    count: int


class FeatureCache:
    """A complete entry, read: its manifest, and its samples by shard."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self.manifest = CacheEntry(self.uri).manifest()
        if self.manifest.get("format_version") not in READABLE_FORMATS:
            raise ValueError(f"{self.uri}: a cache entry of format {self.manifest.get('format_version')}, from before "
                             "the feature store; encode its dataset again (`modrwkv encode --config ...`: each "
                             "media item is then encoded once and shared); `modrwkv cache gc --apply` removes it")
        self.shards = self.manifest["shards"]
        self.store = FeatureStore(storage.parent(self.uri), self.manifest["feature_store"],
                                  key_precision(self.manifest.get("store", {})))
        self.item_reader = ThreadPoolExecutor(8, thread_name_prefix="item-reader")  # item files are small: overlap

    @property
    def id(self) -> str:
        return self.manifest["cache_id"]

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    def __len__(self) -> int:
        return self.manifest["counts"]["written"]

    def index(self, columns: list[str] | None = None):
        """The per-sample index (`index.py`): a pyarrow table of `columns` (default all)."""
        if self.manifest["format_version"] == 2:
            table = from_manifest(self.manifest)
            return table.select(columns) if columns else table
        return read_index(self.uri, columns)

    def sample_tokens(self, compressed=lambda n: n) -> np.ndarray:
        """Each sample's text tokens plus its items' `compressed` feature lengths, from the index alone."""
        return total_tokens(self.index(["text_tokens", "item_tokens"]), compressed)

    def over_length(self, max_length: int, compressed=lambda n: n) -> list[dict]:
        """{"key", "tokens"} of every sample whose text tokens plus its items' `compressed` feature lengths exceed
        `max_length`, from the index alone."""
        tokens = self.sample_tokens(compressed)
        over = np.flatnonzero(tokens > max_length)
        if not len(over):
            return []
        keys = self.index(["key"])["key"].take(over).to_pylist()
        return [{"key": key, "tokens": int(tokens[i])} for key, i in zip(keys, over)]

    def text_only(self) -> int:
        """How many samples hold no item (text-only turns in an image cache, as LLaVA's data has), from the index."""
        return int(np.sum(item_sums(self.index(["item_tokens"]), lambda n: 1) == 0))

    def compressed_to_nothing(self, compressed) -> list[str]:
        """The keys of the samples with an item that `compressed` leaves no feature vector of (fewer than the
        projector's compression kernel), from the index alone."""
        short = np.flatnonzero(item_sums(self.index(["item_tokens"]), lambda n: compressed(n) == 0))
        return self.index(["key"])["key"].take(short).to_pylist() if len(short) else []

    def read_samples(self, index: int) -> list[Sample]:
        """A shard's samples as stored, checked against the manifest: their items named, not read."""
        shard = self.shards[index]
        data = storage.read_bytes(storage.join(self.uri, shard["name"]))
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ValueError(f"{self.uri}/{shard['name']}: sha256 differs from the manifest; the shard was changed "
                             "or damaged after encoding (re-encode with --force)")
        return unpack_shard(data, f"{self.uri}/{shard['name']}")

    def read_shard(self, index: int) -> list[Sample]:
        """A shard's samples with their items' features, each item checked against its digest."""
        return self.with_features(self.read_samples(index))

    def with_features(self, samples: list[Sample]) -> list[Sample]:
        features = self.item_reader.map(self.store.read, [name for s in samples for name in s.item_files])
        for sample in samples:
            sample.items = ([sample.lookback[:, None]] if sample.items_inline
                            else [next(features) for _ in sample.item_files])
        return samples

    def dealt_whole(self, world: int) -> int:
        """How many leading shards go to the workers whole, in turns: rounds of `world` shards of the full size.
        The rest (fewer full shards than workers, and a last short one) each worker shares by sample."""
        full = max(shard["count"] for shard in self.shards)
        leading = next((i for i, shard in enumerate(self.shards) if shard["count"] != full), len(self.shards))
        return leading // world * world

    def shares(self, rank: int, world: int) -> list[Share]:
        """Rank `rank`'s part of the entry: of the shards dealt whole, every `world`-th from `rank`; of the rest,
        every `world`-th sample from `rank`, a share of each shard (features read for those alone). The workers'
        parts are disjoint, cover the entry and differ by a sample at most, so every sample comes round as often."""
        whole = self.dealt_whole(world)
        shares = [Share(i, 0, 1, self.shards[i]["count"]) for i in range(rank, whole, world)]
        before = 0
        for i in range(whole, len(self.shards)):
            count = self.shards[i]["count"]
            first = (rank - before) % world  # the shard's first sample at a position rank + k * world
            if first < count:
                shares.append(Share(i, first, world, len(range(first, count, world))))
            before += count
        return shares

    def read_share(self, share: Share) -> list[Sample]:
        return self.with_features(self.read_samples(share.shard)[share.first::share.step])

    def samples_of(self, rank: int, world: int) -> int:
        """Rank `rank`'s samples an epoch: its whole share. Ranks' epochs may differ by a sample: their streams are
        endless, kept in step by the draws they share, not by running out together."""
        if len(self) < world:
            raise ValueError(f"{self.uri}: {len(self)} samples for {world} workers; every worker needs at least one "
                             "(leave this entry out of a run this wide)")
        return sum(share.count for share in self.shares(rank, world))

    def windows(self, order: list[Share], size: int) -> list[tuple[int, list[Share]]]:
        """`order`'s shares grouped into runs of consecutive shares holding at least `size` samples (the last may
        hold fewer), each with the position of its first sample in the epoch."""
        windows, first, members, held = [], 0, [], 0
        for share in order:
            members.append(share)
            held += share.count
            if held >= size:
                windows.append((first, members))
                first, members, held = first + held, [], 0
        if members:
            windows.append((first, members))
        return windows

    def read_ahead(self, shares: Iterator[Share], threads: int, ahead: int) -> Iterator[list[Sample]]:
        """The decoded `shares`, in order. With `threads`, shares holding at least `ahead` samples beyond the one
        handed out are being read, checked and decoded on background threads, so the consumer waits on storage
        only when it outruns them; with 0, each is read when asked for."""
        if threads == 0:
            yield from map(self.read_share, shares)
            return
        pool, pending = ThreadPoolExecutor(threads, thread_name_prefix="shard-reader"), deque()

        def fill():
            while not pending or sum(count for count, _ in pending) < ahead:
                share = next(shares, None)
                if share is None:
                    return
                pending.append((share.count, pool.submit(self.read_share, share)))

        try:
            fill()
            while pending:
                samples = pending.popleft()[1].result()
                fill()
                yield samples
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def plan(self, rank: int, world: int, seed: int, epoch: int, start: int, epochs: int | None, shuffle: bool,
             window: int) -> Iterator[tuple[int, int, list[Share], int, int]]:
        """(epoch, window, shares, first sample to yield, end) for each window to read, from `start` of `epoch`
        on, for `epochs` epochs (None: endless)."""
        quota = self.samples_of(rank, world)
        if not 0 <= start <= quota:
            raise ValueError(f"{self.uri}: start {start} is outside an epoch's {quota} samples of worker {rank}")
        shares = self.shares(rank, world)
        for e in count(epoch) if epochs is None else range(epoch, epoch + epochs):
            order = list(range(len(shares)))
            if shuffle:
                np.random.default_rng([seed, e, rank]).shuffle(order)
            for w, (first, members) in enumerate(self.windows([shares[i] for i in order], window)):
                skip = start - first if e == epoch else 0
                held = sum(share.count for share in members)
                if first < quota and skip < held:
                    yield e, w, members, max(skip, 0), quota - first

    def iter_samples(self, rank: int = 0, world: int = 1, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                     window: int = 1024, start: int = 0, epochs: int | None = 1,
                     prefetch: int = 4) -> Iterator["Sample"]:
        """This rank's samples from its sample `start` of `epoch` on, for `epochs` epochs (None: endless): each
        epoch's shard order shuffled per (seed, epoch, rank), then the samples of each window of consecutive shards
        (at least `window` samples) permuted together. Because the order is fixed by the seed alone, a position is
        a plain count, and starting at `start` reads no shard before the window that holds it (a resumed run
        does not replay its data). `prefetch` threads read the next window while this one is consumed."""
        windows, reading = tee(self.plan(rank, world, seed, epoch, start, epochs, shuffle, window))
        share_order = (share for _, _, members, _, _ in reading for share in members)
        with closing(self.read_ahead(share_order, prefetch, window)) as shares:
            for e, w, members, skip, end in windows:
                samples = [sample for _ in members for sample in next(shares)]
                if shuffle:
                    permutation = np.random.default_rng([seed, e, rank, w]).permutation(len(samples))
                    samples = [samples[i] for i in permutation]
                yield from samples[skip:end]
