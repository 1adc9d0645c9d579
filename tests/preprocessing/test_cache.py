"""The cache format: deterministic shards, receipts, the manifest written last, and the training-side reader."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from modrwkv.conversation import Turn
from modrwkv.conversation import Sample
from preprocessing.cache.entry import STORE_FOLDER, CacheEntry, FeatureCache, cache_id, pack_shard, unpack_shard
from preprocessing.cache.key import store_key
from preprocessing.storage import Fingerprints
from tests.cache_entries import STORE
from tests.cache_entries import write_entry as write_samples


def samples(n, start=0):
    return [Sample(f"s{i:03d}", "image", [Turn("user", "<image>")], items=[np.full((2 + i % 3, 4), i, np.float16)],
                   meta={"i": i}) for i in range(start, start + n)]


def test_shards_are_deterministic_and_never_pickled(tmp_path):
    data = pack_shard(samples(3))
    assert data == pack_shard(samples(3))
    back = unpack_shard(data)
    assert [s.key for s in back] == ["s000", "s001", "s002"]
    assert back[2].meta == {"i": 2} and back[2].turns == [Turn("user", "<image>")] and back[2].items == []
    with pytest.raises(ValueError, match="Object arrays cannot be saved when allow_pickle=False"):
        pack_shard([Sample("x", "series", [], lookback=np.array([{"a": 1}], dtype=object))])


def test_a_long_sample_key_is_stored_and_short_ones_as_ustar_stores_them():
    """A key of 88 characters or more made "<key>.lookback.npy" longer than USTAR's 100 characters: the job failed
    after encoding ("name is too long"). Shards of short keys keep the bytes earlier encodes wrote."""
    import io
    import tarfile

    key = "electricity_load_diagrams_20112014_portugal-H-data-MT_001_active_power_consumption_kw-120"
    window = Sample(key, "series", [Turn("user", "<series>")], [], lookback=np.zeros(3, np.float32),
                    target=np.zeros(1, np.float32))
    (back,) = unpack_shard(pack_shard([window]))
    assert back.key == key and len(f"{key}.lookback.npy") > 100
    packed = pack_shard(samples(2))
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    ustar = io.BytesIO()
    with tarfile.open(fileobj=ustar, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # as shards were written
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    assert ustar.getvalue() == packed


def test_a_sample_is_stored_in_the_layout_entries_of_format_2_hold():
    """Entries written before the `Sample` type stay readable: the same members, the same json document."""
    import io
    import tarfile

    sample = Sample("w0", "series", [Turn("user", "<series>\nNext?")], ["ab/ab_3_0.npy"],
                    lookback=np.array([1.0, 2.0, 3.0], np.float32), target=np.array([4.0], np.float32),
                    meta={"mean": 2.0, "std": 0.5, "id": "w0"})
    data = pack_shard([sample])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert list(members) == ["w0.lookback.npy", "w0.target.npy", "w0.json"]
    assert json.loads(members["w0.json"]) == {"features": ["ab/ab_3_0.npy"], "id": "w0", "mean": 2.0,
                                               "modality": "series", "std": 0.5,
                                               "turns": [{"role": "user", "text": "<series>\nNext?"}]}
    (back,) = unpack_shard(data)
    assert (back.key, back.modality, back.turns, back.item_files, back.meta) == \
        (sample.key, sample.modality, sample.turns, sample.item_files, sample.meta)
    assert np.array_equal(back.lookback, sample.lookback) and np.array_equal(back.target, sample.target)
    with pytest.raises(ValueError, match="sample 'w0': unknown members \\['item0.npy'\\]"):
        Sample.from_shard_record({**sample.to_shard_record(), "item0.npy": np.zeros(1)})


def test_cache_ids_change_with_any_input():
    spec = {"encoder": {"kind": "clip", "weights_hash": "a"}, "preprocessing": {"x": 1}, "source_hash": "s"}
    changed = {**spec, "encoder": {"kind": "clip", "weights_hash": "b"}}
    assert cache_id(spec) == cache_id(dict(reversed(list(spec.items()))))
    assert cache_id(spec) != cache_id(changed)


ENTRY = "image-test-00000000000000e1"  # named as encode jobs name entries: `gc` and `cache ls` know no other
NAMES = {"kept": "image-test-000000000000ce01", "old": "image-test-000000000000ce02",
         "unfinished": "image-test-000000000000ce03", "gone": "image-test-000000000000ce04"}


def write_entry(uri, counts):
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return write_samples(uri, [samples(n, start) for n, start in zip(counts, starts)])


def test_the_index_holds_every_sample_and_the_manifest_none(tmp_path):
    """One row per sample, in shard order: its shard, key, lengths and item files; the manifest keeps the shards'
    checksums alone, so it stays small however many samples the entry holds."""
    uri = str(tmp_path / "e")
    write_entry(uri, [3, 2])
    cache = FeatureCache(uri)
    assert all(set(shard) == {"name", "count", "sha256", "bytes"} for shard in cache.manifest["shards"])
    index = cache.index().to_pydict()
    stored = [s for i in range(len(cache.shards)) for s in cache.read_samples(i)]
    assert index["key"] == [s.key for s in stored] == [f"s{i:03d}" for i in range(5)]
    assert index["shard"] == [0, 0, 0, 1, 1] and index["text_tokens"] == [0] * 5
    assert index["item_files"] == [s.item_files for s in stored]
    assert index["item_tokens"] == [[2 + i % 3] for i in range(5)]  # the features' vectors, as their names say
    assert cache.over_length(3) == [{"key": "s002", "tokens": 4}]
    assert cache.over_length(1, lambda n: n - 1) == [{"key": "s001", "tokens": 2}, {"key": "s002", "tokens": 3},
                                                     {"key": "s004", "tokens": 2}]


def test_an_entry_of_format_2_opens_counts_and_keeps_its_items(tmp_path):
    """Entries written before the index (keys and lengths in the manifest) are read alike and are not garbage."""
    from preprocessing.cache.inventory import describe, garbage, inventory

    root = tmp_path / "cache"
    write_entry(str(root / ENTRY), [3, 2])
    new = FeatureCache(str(root / ENTRY))
    index, over = new.index().to_pydict(), new.over_length(1, lambda n: n - 1)
    manifest = {**new.manifest, "format_version": 2, "shards": [
        {**shard, "keys": [k for k, i in zip(index["key"], index["shard"]) if i == n],
         "lengths": [[t, items] for t, items, i in zip(index["text_tokens"], index["item_tokens"], index["shard"])
                     if i == n]} for n, shard in enumerate(new.manifest["shards"])]}
    (root / ENTRY / "manifest.json").write_text(json.dumps(manifest))
    (root / ENTRY / "index.parquet").unlink()
    old = FeatureCache(str(root / ENTRY))
    assert old.index(["key"])["key"].to_pylist() == index["key"]
    assert old.over_length(1, lambda n: n - 1) == over and len(over) == 3
    _, (store,) = inventory(str(root))
    assert set(store.referenced) == {f for files in index["item_files"] for f in files}
    assert garbage(str(root), grace_s=0) == [] and "complete" in describe(str(root), sizes=False)


def test_reader_splits_shards_evenly_and_shuffles_by_seed(tmp_path):
    manifest = write_entry(str(tmp_path / "e"), [4, 4, 3, 1])
    assert manifest["counts"] == {"read": 12, "written": 12, "rejected": 0}
    cache = FeatureCache(str(tmp_path / "e"))
    rank0 = [s.key for s in cache.iter_samples(0, 2, seed=1, window=3)]
    rank1 = [s.key for s in cache.iter_samples(1, 2, seed=1, window=3)]
    assert len(rank0) == len(rank1) == 6  # by shard 4 + 3 against 4 + 1: by sample
    assert not set(rank0) & set(rank1)
    assert rank0 == [s.key for s in cache.iter_samples(0, 2, seed=1, window=3)]
    assert rank0 != [s.key for s in cache.iter_samples(0, 2, seed=1, epoch=1, window=3)]
    in_order = [s.key for s in cache.iter_samples(shuffle=False)]
    assert in_order == [f"s{i:03d}" for i in range(12)]


def test_an_entry_with_too_few_shards_to_go_round_is_shared_by_sample(tmp_path, monkeypatch):
    """A small entry (a collection's small dataset: fewer shards than workers, or a full shard and a small last
    one) still gives every worker its samples: each reads every shard and takes every world-th sample (reading
    their features alone), so the workers' samples are disjoint, cover the entry and are as even as can be, and a
    start resumes exactly. Fewer samples than workers is refused by name."""
    write_entry(str(tmp_path / "e"), [4, 4, 3, 1])
    cache = FeatureCache(str(tmp_path / "e"))
    assert [cache.samples_of(r, 5) for r in range(5)] == [3, 3, 2, 2, 2]  # 12 samples
    ranks = [[s.key for s in cache.iter_samples(r, 5, seed=1, window=3)] for r in range(5)]
    assert [len(keys) for keys in ranks] == [3, 3, 2, 2, 2]
    assert len({key for keys in ranks for key in keys}) == 12
    held = [[s.key for s in cache.iter_samples(r, 5, seed=1, window=3, shuffle=False, start=0)] for r in range(5)]
    assert held[2] == ["s002", "s007"] and held[0] == ["s000", "s005", "s010"]
    assert sorted(ranks[3]) == held[3] == ["s003", "s008"] and set(ranks[0]) == {"s000", "s005", "s010"}
    for world, window in ((5, 1), (5, 2), (2, 1), (2, 3)):  # shuffled shares, 2 epochs: each start resumes exactly
        for rank in range(world):
            whole = [s.key for s in cache.iter_samples(rank, world, seed=1, window=window, epochs=2)]
            assert len(whole) == 2 * cache.samples_of(rank, world)
            for start in range(cache.samples_of(rank, world) + 1):
                assert [s.key for s in cache.iter_samples(rank, world, seed=1, window=window, epochs=2,
                                                          start=start)] == whole[start:]
    read = []  # features are read for a worker's own samples alone
    original = cache.store.read
    monkeypatch.setattr(cache.store, "read", lambda name: read.append(name) or original(name))
    list(cache.iter_samples(0, 5, seed=1, window=3, prefetch=0))
    assert len(read) == sum(share.count for share in cache.shares(0, 5)) == 3
    with pytest.raises(ValueError, match="12 samples for 13 workers"):
        cache.samples_of(0, 13)
    write_entry(str(tmp_path / "uneven"), [8, 1])  # by shard, 8 samples against 1; by sample, 5 and 4
    uneven = FeatureCache(str(tmp_path / "uneven"))
    assert uneven.dealt_whole(2) == 0
    halves = [{s.key for s in uneven.iter_samples(r, 2, seed=2)} for r in (0, 1)]
    assert [len(h) for h in halves] == [5, 4] and not halves[0] & halves[1]


@pytest.mark.parametrize("counts, whole", [([4, 4, 4, 4], 4), ([4, 4, 4], 2), ([20, 20, 20, 17], 2),
                                           ([6, 6, 6, 6, 6, 1], 4)])
def test_each_epoch_the_workers_read_every_sample_once_and_as_many(tmp_path, counts, whole):
    """Rounds of full shards dealt whole, the rest shared by sample: no worker's epoch stops short of its share
    (where every worker was cut to the smallest share's count, a third of [4, 4, 4] was left out each epoch, the same
    shards' samples more often than others'), and the workers' epochs differ by a sample at most."""
    write_entry(str(tmp_path / "e"), counts)
    cache = FeatureCache(str(tmp_path / "e"))
    assert cache.dealt_whole(2) == whole
    assert [sum(s.step == 1 for s in cache.shares(r, 2)) for r in (0, 1)] == [whole // 2] * 2
    assert abs(cache.samples_of(0, 2) - cache.samples_of(1, 2)) <= 1
    for epoch in (0, 1):
        keys = [s.key for r in (0, 1) for s in cache.iter_samples(r, 2, seed=3, epoch=epoch, window=4)]
        assert sorted(keys) == [f"s{i:03d}" for i in range(sum(counts))]


def test_reader_starts_at_a_count_reading_no_earlier_window(tmp_path, monkeypatch):
    write_entry(str(tmp_path / "e"), [3, 3, 3, 3, 2])
    cache = FeatureCache(str(tmp_path / "e"))
    shares = cache.shares(0, 1)
    assert [(first, [s.shard for s in members]) for first, members in cache.windows(shares, 5)] == \
        [(0, [0, 1]), (6, [2, 3]), (12, [4])]
    whole = [s.key for s in cache.iter_samples(seed=3, epoch=2, window=5)]
    assert sorted(whole) == [f"s{i:03d}" for i in range(14)] and whole != sorted(whole)
    three = [s.key for s in cache.iter_samples(seed=3, epoch=2, window=5, epochs=3)]
    assert three[:14] == whole and three[14:28] != whole and sorted(three[28:]) == sorted(whole)
    read = []
    original = FeatureCache.read_samples
    monkeypatch.setattr(FeatureCache, "read_samples", lambda self, i: read.append(i) or original(self, i))
    for start in (0, 5, 6, 13, 14):
        read.clear()
        assert [s.key for s in cache.iter_samples(seed=3, epoch=2, window=5, start=start)] == whole[start:]
        held = sum(cache.shards[i]["count"] for i in read)  # what it read beyond what it yields: one window's head
        assert 0 <= held - (14 - start) < 5 + 2 and (start < 14 or not read)
    endless = cache.iter_samples(seed=3, epoch=2, window=5, start=9, epochs=None)
    assert [next(endless).key for _ in range(5 + 28)] == three[9:]
    for depth in (0, 1, 8):  # how many threads read ahead changes nothing in what is read
        assert [s.key for s in cache.iter_samples(seed=3, epoch=2, window=5, epochs=3, prefetch=depth)] == three
    with pytest.raises(ValueError, match="start 15 is outside an epoch's 14 samples"):
        next(cache.iter_samples(start=15))


def test_reader_reads_the_next_window_while_this_one_is_consumed(tmp_path, monkeypatch):
    write_entry(str(tmp_path / "e"), [3, 3, 3, 3, 2])
    cache, read = FeatureCache(str(tmp_path / "e")), []
    original = FeatureCache.read_samples
    monkeypatch.setattr(FeatureCache, "read_samples", lambda self, i: read.append(i) or original(self, i))
    samples = cache.iter_samples(shuffle=False, window=5, epochs=None, prefetch=2)
    next(samples)  # window 0 (shards 0, 1) is in hand; shards 2 and 3 (window 1) and nothing more are on their way
    deadline = time.time() + 10
    while len(read) < 4 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert sorted(read) == [0, 1, 2, 3]
    samples.close()  # stops the readers


def test_reader_refuses_changed_shards_and_unfinished_entries(tmp_path):
    uri = str(tmp_path / "e")
    write_entry(uri, [2, 2])
    shard = tmp_path / "e" / "shard-00001.tar"
    shard.write_bytes(pack_shard(samples(2, 100)))
    with pytest.raises(ValueError, match="shard-00001.tar: sha256 differs from the manifest"):
        FeatureCache(uri).read_shard(1)
    with pytest.raises(ValueError, match="shard-00001.tar: sha256 differs"):  # raised on a reader thread, seen here
        list(FeatureCache(uri).iter_samples(shuffle=False))
    entry = CacheEntry(uri)
    entry.clear()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        FeatureCache(uri)


def test_reader_refuses_changed_features_and_entries_from_before_the_store(tmp_path):
    uri = str(tmp_path / "e")
    write_entry(uri, [2])
    item = sorted((tmp_path / "features" / STORE).glob("*/*.npy"))[0]
    np.save(item, np.zeros((3, 4), np.float16), allow_pickle=False)
    with pytest.raises(ValueError, match=f"{item.name}: sha256 differs from its name"):
        FeatureCache(uri).read_shard(0)
    manifest = tmp_path / "e" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 3', '"format_version": 1'))
    with pytest.raises(ValueError, match="format 1, from before the feature store; encode its dataset again"):
        FeatureCache(uri)


def test_shards_read_back_through_webdataset_and_ray_data(tmp_path, ray_local):
    import webdataset as wds

    write_entry(str(tmp_path / "e"), [3])
    url = str(tmp_path / "e" / "shard-00000.tar")
    decoded = list(wds.WebDataset(url, shardshuffle=False).decode())
    assert [s["__key__"] for s in decoded] == ["s000", "s001", "s002"]
    assert decoded[2]["json"]["i"] == 2
    # the features live in the store beside the entry, named in each sample's json
    (name,) = decoded[1]["json"]["features"]
    stored = np.load(tmp_path / "features" / STORE / name, allow_pickle=False)
    assert np.array_equal(stored, samples(3)[1].items[0])
    rows = ray_local.data.read_webdataset(url).take_all()
    assert sorted(r["__key__"] for r in rows) == ["s000", "s001", "s002"]


def test_gc_finds_exactly_what_no_complete_entry_uses(tmp_path):
    from pipelines.cli import main
    from preprocessing.cache.entry import FeatureStore
    from preprocessing.cache.inventory import describe, garbage

    root = tmp_path / "cache"
    write_entry(str(root / NAMES["kept"]), [2, 1])
    write_entry(str(root / NAMES["old"]), [1])  # will look like an entry of the first format
    (root / NAMES["old"] / "manifest.json").write_text('{"format_version": 1}')
    write_entry(str(root / NAMES["unfinished"]), [1])
    (root / NAMES["unfinished"] / "manifest.json").unlink()
    orphan = FeatureStore(str(root), STORE).write("f" * 64, np.ones((2, 4), np.float16))
    (root / "features" / STORE / "ab").mkdir(exist_ok=True)
    (root / "features" / STORE / "ab" / "x.npy.tmp-12345678").write_bytes(b"half")
    (root / NAMES["unfinished"] / "shard-00001.json.tmp-0123abcd").write_bytes(b"half")
    others = [root / "llava" / "train.json", root / "llava" / "images" / "1.jpg",
              root / NAMES["unfinished"] / "notes.txt"]
    for path in others:  # a dataset kept beside its caches, a user's file in an entry: no cache's files
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not the cache's")
    # series records: of an entry kept, of one gc removes, of one gone, damaged, half-written; a user's note
    (root / "resolved").mkdir()
    records = {entry: f"{i:032x}.json" for i, entry in enumerate(("kept", "old", "gone"))}
    for entry, name in records.items():
        (root / "resolved" / name).write_text(json.dumps({"entry": str(root / NAMES[entry]), "files": {}}))
    (root / "resolved" / f"{3:032x}.json").write_text("[")
    (root / "resolved" / f"{4:032x}.json.tmp-0123abcd").write_text("{")
    (root / "resolved" / "notes.json").write_text("{")
    assert garbage(str(root), grace_s=3600) == []  # everything is younger than an hour: a job may be writing it
    found = {Path(u).relative_to(root).as_posix() for u in garbage(str(root), grace_s=0)}
    old = {p.relative_to(root).as_posix() for p in (root / NAMES["old"]).iterdir()}
    unfinished = {p.relative_to(root).as_posix() for p in (root / NAMES["unfinished"]).iterdir()
                  if p.name != "notes.txt"}
    assert old <= found and unfinished <= found and f"features/{STORE}/{orphan}" in found
    assert f"features/{STORE}/ab/x.npy.tmp-12345678" in found
    assert {f.removeprefix("resolved/") for f in found if f.startswith("resolved/")} == {
        records["old"], records["gone"], f"{3:032x}.json", f"{4:032x}.json.tmp-0123abcd"}
    assert not any(f.startswith(NAMES["kept"] + "/") for f in found)
    assert not {p.relative_to(root).as_posix() for p in others} & found
    assert "llava" not in describe(str(root), sizes=False)
    kept = FeatureCache(str(root / NAMES["kept"])).iter_samples(shuffle=False)
    kept_items = {n for s in kept for n in s.item_files}
    assert not {f"features/{STORE}/{n}" for n in kept_items} & found
    assert NAMES["kept"] in describe(str(root), sizes=True) and "old format" in describe(str(root), sizes=False)
    assert main(["cache", "gc", "--root", str(root), "--grace-hours", "0", "--apply"]) == 0
    assert garbage(str(root), grace_s=0) == []
    assert len(list(FeatureCache(str(root / NAMES["kept"])).iter_samples())) == 3
    assert all(path.read_text() == "not the cache's" for path in others)


def test_a_store_holding_an_item_twice_gives_the_newer_file(tmp_path):
    """`run.force` writes an item again beside the file older entries still name: what a later entry reuses is the
    forced job's, whichever digest sorts first."""
    from preprocessing.cache.entry import FeatureStore

    store, ref = FeatureStore(str(tmp_path), STORE), "e" * 64
    old = store.write(ref, np.zeros((2, 4), np.float16))
    for value in range(1, 100):  # a newer file whose name sorts before the old one's
        new = store.write(ref, np.full((2, 4), value, np.float16))
        if new < old:
            break
        (tmp_path / STORE_FOLDER / STORE / new).unlink()
    os.utime(tmp_path / STORE_FOLDER / STORE / old, ns=(1, 1))  # written long before
    assert store.items() == {ref: new}


def test_gc_keeps_what_a_running_encode_holds_a_lease_on_and_what_only_looks_like_an_entry(tmp_path):
    """An encode of two hours: its receipts and the old store items it reuses, not referenced by any complete entry
    yet, are kept while its lease is fresh, and are garbage once the lease is stale (the job killed). A user's
    folders holding files named like an entry's (a WebDataset's shards, a manifest) are no entry."""
    from preprocessing.cache.entry import FeatureStore
    from preprocessing.cache.inventory import garbage
    from preprocessing.cache.lease import LEASE, lease

    root = tmp_path / "cache"
    write_entry(str(root / NAMES["unfinished"]), [1])
    (root / NAMES["unfinished"] / "manifest.json").unlink()
    reused = FeatureStore(str(root), STORE).write("e" * 64, np.ones((2, 4), np.float16))
    write_entry(str(root / "renamed-by-hand"), [2])  # complete: an entry by its manifest, whatever its name
    for path, text in ((root / "laion-wds" / "shard-000000.tar", "a user's"), (root / "mydata" / "manifest.json",
                                                                                 '{"format_version": 1}')):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    two_hours_ago = time.time() - 7200
    for path in root.rglob("*"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    with lease(str(root / NAMES["unfinished"]), STORE):
        assert garbage(str(root), grace_s=3600) == []
        assert garbage(str(root), grace_s=0) == []  # a lease is fresh for 3 renewals, whatever the grace
    assert not (root / NAMES["unfinished"] / LEASE).exists()  # removed when the job ends
    (root / NAMES["unfinished"] / LEASE).write_text(json.dumps({"store": STORE}))  # a killed job's
    os.utime(root / NAMES["unfinished"] / LEASE, (two_hours_ago, two_hours_ago))
    found = {Path(u).relative_to(root).as_posix() for u in garbage(str(root), grace_s=3600)}
    assert f"features/{STORE}/{reused}" in found and f"{NAMES['unfinished']}/{LEASE}" in found
    assert not {"laion-wds/shard-000000.tar", "mydata/manifest.json"} & found
    assert not [f for f in found if f.startswith("renamed-by-hand/")]
    renamed = {f"features/{STORE}/{n}" for s in FeatureCache(str(root / "renamed-by-hand")).iter_samples()
               for n in s.item_files}
    assert len(renamed) == 2 and not renamed & found


def test_readers_parse_npy_headers_one_thread_at_a_time(tmp_path, monkeypatch):
    """Shards and items are read on several threads, and numpy parses .npy headers with `ast`, which CPython 3.11.7
    (this project's) corrupts when two threads parse at once (gh-106905; seen once in CI): every np.load of the
    readers runs under the lock."""
    import preprocessing.cache.entry as entry

    real_load, calls = np.load, []

    def checked_load(*args, **kwargs):
        assert entry._NPY_HEADER.locked(), "np.load outside the reader's lock"
        calls.append(1)
        return real_load(*args, **kwargs)

    write_entry(str(tmp_path / "e"), [3, 2])
    monkeypatch.setattr(np, "load", checked_load)
    read = [s for s in FeatureCache(str(tmp_path / "e")).iter_samples(shuffle=False)]
    assert [s.key for s in read] == [f"s{i:03d}" for i in range(5)] and len(calls) == 5  # each sample's item


def test_cache_cp_carries_an_entry_with_only_its_items_through_s3_and_back(tmp_path, s3_server, monkeypatch, capsys):
    """Two entries share a store; copying one takes its own items alone, to S3 and from there to a folder, and
    the copy reads back the same samples; a second copy finds the items there and copies none of them again."""
    from pipelines.cli import main
    from preprocessing.cache.copy import copy_entry
    from preprocessing.cache.inventory import inventory
    from tests.services import BUCKET

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "cache"
    write_entry(str(root / ENTRY), [2, 1])
    write_samples(str(root / "b"), [samples(2, start=10)])
    (root / "features" / STORE / "store.json").write_text("{}")  # the key an encode job writes
    remote = f"s3://{BUCKET}/copied"
    assert main(["cache", "cp", str(root / ENTRY), "--to", remote]) == 0
    assert "3 items copied, 0 already there" in capsys.readouterr().out
    again = copy_entry(str(root / ENTRY), remote, progress=False)
    assert (again.items_copied, again.items_present) == (0, 3)
    local = copy_entry(f"{remote}/{ENTRY}", str(tmp_path / "elsewhere"), progress=False)
    entries, (store,) = inventory(str(tmp_path / "elsewhere"))
    assert [e.name for e in entries] == [ENTRY] and len(store.items) == 3 == len(store.referenced)
    assert (store.files.keys() - store.items.keys()) == {"store.json"}
    original = list(FeatureCache(str(root / ENTRY)).iter_samples(shuffle=False))
    copied = list(FeatureCache(local.uri).iter_samples(shuffle=False))
    assert [s.key for s in copied] == [s.key for s in original]
    assert all(np.array_equal(x, y) for s, t in zip(copied, original) for x, y in zip(s.items, t.items))
    with pytest.raises(ValueError, match="already in"):
        copy_entry(str(root / ENTRY), str(root))
    (root / "b" / "manifest.json").unlink()
    assert main(["cache", "cp", str(root / "b"), "--to", str(tmp_path / "elsewhere")]) == 2
    assert "never finished" in capsys.readouterr().err


def test_a_chosen_encoder_layer_joins_the_store_key_and_the_default_keeps_the_old_one(tmp_path):
    encoder = {"kind": "dinov2", "model_dir": None, "dtype": "fp32", "image_size": 112}

    def key(**extra):
        return store_key("image", {**encoder, **extra}, {"max_pixels": 1}, Fingerprints(str(tmp_path)))

    assert key() == key(layer=None) and "layer" not in key()  # stores written before `layer` existed stay valid
    assert key(layer=8) != key() and key(layer=8) != key(layer=-2)
    int8 = store_key("image", encoder, {"max_pixels": 1}, Fingerprints(str(tmp_path)), "int8")
    assert int8 != key() and int8["precision"] == "int8" and "precision" not in key()  # likewise for fp16 stores


def test_an_encoder_whose_features_our_code_changed_keys_a_new_store(tmp_path):
    def key(kind):
        encoder = {"kind": kind, "model_dir": None, "dtype": "fp32", "image_size": None}
        return store_key("audio", encoder, {"max_audio_seconds": 30}, Fingerprints(str(tmp_path)))

    assert key("wavlm")["revision"] == 3  # the padded-batch and always-normalised stores are not reused
    assert key("dinov2")["revision"] == key("siglip2")["revision"] == 2  # images upright, transparency on white
    assert key("raw")["revision"] == key("fracast")["revision"] == key("timer")["revision"] == 2  # float64 z-scores
    assert "revision" not in key("whisper")  # unchanged kinds keep the keys their stores were written under


def test_int8_items_decode_within_half_a_step_and_read_back_as_features(tmp_path):
    from preprocessing.cache.entry import FeatureStore
    from preprocessing.cache.precision import from_stored, to_stored

    features = np.random.default_rng(0).normal(0, 3, (65, 384)).astype(np.float32)
    features[3] = 0  # a zero vector: its scale is 0, its codes 0
    stored = to_stored(features, "int8")
    assert stored.dtype == np.int8 and stored.shape == (65, 386)
    assert stored.nbytes / to_stored(features, "fp16").nbytes < 0.51
    step = np.ascontiguousarray(stored[:, -2:]).view(np.float16).astype(np.float32)
    assert np.all(step * 127 >= np.abs(features).max(axis=1, keepdims=True))  # every value within 127 steps
    decoded = from_stored(stored, "int8")
    assert np.all(np.abs(decoded - features) <= step / 2) and not decoded[3].any()
    store = FeatureStore(str(tmp_path), "image-test-int8", "int8")
    assert np.array_equal(store.read(store.write("ab" * 32, stored)), decoded)


def test_raw_series_windows_read_as_their_lookback_and_entries_with_store_items_as_before(tmp_path):
    """A raw window's item is its normalised lookback, in its shard (no store file); an entry written when raw windows
    had store items still reads them from the store."""
    lookback = np.linspace(-1, 1, 8, dtype=np.float32)
    turns = [Turn("user", "<series>\nForecast."), Turn("assistant", "")]
    window = Sample("w0", "series", turns, lookback=lookback, target=np.zeros(2, np.float32))
    entry = CacheEntry(str(tmp_path / "inline"))
    entry.write_shard(0, pack_shard([window]), ["w0"], [], [[0, [8]]], [[]])
    entry.finish({"modality": "series"}, 1, [], n_read=1, extra={"feature_store": STORE})
    (inline,) = FeatureCache(str(tmp_path / "inline")).read_shard(0)
    assert inline.items_inline and inline.items[0].shape == (8, 1) and inline.items[0].dtype == np.float32
    np.testing.assert_array_equal(inline.items[0][:, 0], lookback)
    stored = Sample("w0", "series", turns, items=[lookback[:, None] * 2], lookback=lookback,
                    target=np.zeros(2, np.float32))
    write_samples(str(tmp_path / "before"), [[stored]], modality="series")
    (before,) = FeatureCache(str(tmp_path / "before")).read_shard(0)
    assert not before.items_inline and before.item_files
    np.testing.assert_array_equal(before.items[0], lookback[:, None] * 2)  # the store's, not the lookback


def test_a_shard_is_kept_on_a_resume_only_beside_its_own_receipt(tmp_path, monkeypatch):
    """A run died between rewriting a shard and its receipt: the older run's receipt stayed beside other bytes, and
    a resume whose plan matched it kept bytes whose sha256 no read would pass. A shard cut short is not kept
    either."""
    import preprocessing.storage as storage

    entry = CacheEntry(str(tmp_path / "entry"))
    first = entry.write_shard(0, b"a" * 100, ["k0"], [], [[0, []]], [[]])
    entry.write_shard(1, b"b" * 100, ["k1"], [], [[0, []]], [[]])
    assert set(entry.done_shards()) == {0, 1} and entry.done_shards()[0] == first
    real_write = storage.write_atomic

    def dies_before_the_receipt(uri, data):
        if uri.endswith(".json"):
            raise KeyboardInterrupt
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_atomic", dies_before_the_receipt)
    with pytest.raises(KeyboardInterrupt):
        entry.write_shard(0, b"c" * 100, ["k0"], [], [[0, []]], [[]])  # other bytes, the same size and samples
    monkeypatch.undo()
    Path(entry.path("shard-00001.tar")).write_bytes(b"b" * 60)  # cut short
    assert entry.done_shards() == {}


def test_a_damaged_receipt_is_written_again_and_damaged_records_are_named(tmp_path, capsys):
    """A node crash left a receipt empty (a local write is not synced): every resume failed on it with json's bare
    "Expecting value"; now its shard is written again. A damaged manifest or store key names its file; a damaged
    record of a folder's file hashes is none (the files are hashed again)."""
    from preprocessing import storage
    from preprocessing.cache.entry import FeatureStore

    entry = CacheEntry(str(tmp_path / "entry"))
    entry.write_shard(0, b"a" * 100, ["k0"], [], [[0, []]], [[]])
    entry.write_shard(1, b"b" * 100, ["k1"], [], [[0, []]], [[]])
    Path(entry.path("shard-00001.json")).write_bytes(b"")
    assert set(entry.done_shards()) == {0}
    assert f"note: {entry.path('shard-00001.json')}: not JSON (" in capsys.readouterr().out
    Path(entry.path("manifest.json")).write_bytes(b'{"counts": ')
    with pytest.raises(ValueError, match=f"{entry.path('manifest.json')}: not JSON"):
        entry.manifest()
    store = FeatureStore(str(tmp_path / "cache"), STORE)
    store.write("f" * 64, np.ones((2, 4), np.float16))
    Path(store.uri, "store.json").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=f"{store.uri}/store.json: not JSON"):
        store.key()

    files = storage.Fingerprints(str(tmp_path / "hashes"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(b"abc")
    uri = str(tmp_path / "data" / "a.bin")
    digest = files.sha256s([uri])[uri]
    Path(files.record_uri(str(tmp_path / "data"))).write_bytes(b"{")
    assert files.sha256s([uri])[uri] == digest


def test_gc_removes_nothing_through_a_link_out_of_the_root(tmp_path):
    """A store folder linked to another disk (or another root's): its files were listed through the link as
    garbage, and deleting them deleted the other root's."""
    from pipelines.cli import main
    from preprocessing.cache.entry import FeatureStore
    from preprocessing.cache.inventory import garbage

    other = tmp_path / "other-root"
    item = FeatureStore(str(other), STORE).write("f" * 64, np.ones((2, 4), np.float16))
    root = tmp_path / "cache"
    write_entry(str(root / NAMES["kept"]), [1])
    (root / "features" / "linked").symlink_to(other / "features" / STORE)
    assert garbage(str(root), grace_s=0) == []
    assert main(["cache", "gc", "--root", str(root), "--grace-hours", "0", "--apply"]) == 0
    assert (other / "features" / STORE / item).is_file()


def test_gc_keeps_a_store_a_job_writes_in_now_and_looks_again_before_it_deletes(tmp_path, capsys):
    """A running encode's half-written items (grace 0 took them); and what a job that started after gc's listing
    holds, or an entry finished meanwhile, is kept by the deletion that follows the listing."""
    from pipelines.cli import main
    from preprocessing.cache.entry import FeatureStore
    from preprocessing.cache.inventory import garbage, sweep
    from preprocessing.cache.lease import lease

    root = tmp_path / "cache"
    write_entry(str(root / NAMES["unfinished"]), [1])
    (root / NAMES["unfinished"] / "manifest.json").rename(tmp_path / "manifest.json")
    unused = FeatureStore(str(root), STORE).write("e" * 64, np.ones((2, 4), np.float16))
    (root / "features" / STORE / "ab").mkdir(exist_ok=True)
    (root / "features" / STORE / "ab" / "x.npy.tmp-12345678").write_bytes(b"half")
    with lease(str(root / NAMES["gone"]), STORE):  # the store held: not one of its files, half-written or not
        assert not [uri for uri in garbage(str(root), grace_s=0) if "/features/" in uri]
    found = garbage(str(root), grace_s=0)
    assert f"{root}/features/{STORE}/{unused}" in found and f"{root}/{NAMES['unfinished']}/index.parquet" in found
    with lease(str(root / NAMES["gone"]), STORE):  # a job starts after the listing
        (tmp_path / "manifest.json").rename(root / NAMES["unfinished"] / "manifest.json")  # and one finishes
        assert sweep(str(root), found, grace_s=0) == []
    assert (root / "features" / STORE / unused).is_file() and FeatureCache(str(root / NAMES["unfinished"]))
    assert main(["cache", "gc", "--root", str(root), "--grace-hours", "0", "--apply"]) == 0
    assert not (root / "features" / STORE / unused).exists()
    assert "removed: 2 files" in capsys.readouterr().out  # the unused item and the half-written one


def test_gc_keeps_the_items_of_an_entry_finished_after_its_listing_with_no_lease_left(tmp_path):
    """A short job (a rerun reusing a killed run's items) can take its lease, write its manifest and let the lease go
    between gc's listing and its deletions: no lease to see, and its items were deleted from under a complete entry.
    The sweep keeps what any entry finished since the listing references (its own files too)."""
    from preprocessing.cache.inventory import collect, sweep

    root = tmp_path / "cache"
    write_entry(str(root / NAMES["unfinished"]), [2])
    (root / NAMES["unfinished"] / "manifest.json").rename(tmp_path / "manifest.json")
    found, listed = collect(str(root), grace_s=0)
    items = [uri for uri in found if "/features/" in uri]
    assert len(items) == 2 and NAMES["unfinished"] not in listed
    (tmp_path / "manifest.json").rename(root / NAMES["unfinished"] / "manifest.json")  # the job, done meanwhile
    looks = []
    assert sweep(str(root), found, grace_s=0, listed=listed, on_look=lambda: looks.append(1)) == []
    assert len(list(FeatureCache(str(root / NAMES["unfinished"])).iter_samples())) == 2 and looks == [1]


def test_a_job_under_a_gc_sweep_waits_for_a_look_that_sees_its_lease(tmp_path):
    """While `cache gc --apply` sweeps a root (its mark renewed, its looks at the leases counted as they start), a job
    about to check what it reuses waits for a look started after it asked: by then every deletion made without seeing
    its lease has happened, and the check names it (a fixed wait did not hold when a look took longer than its
    interval). A sweep that ends lets it go; no sweep, or a killed one's mark, costs no wait."""
    import threading

    from preprocessing.cache.lease import SWEEP, sweeping, wait_out_sweep

    root = tmp_path / "cache"
    root.mkdir()
    wait_out_sweep(str(root))  # no sweep: at once
    with sweeping(str(root), recheck_s=1.0) as mark:  # stale after 3 s: a late renewal is not a killed gc
        assert json.loads((root / SWEEP).read_text())["looks"] == 0
        jobs = [threading.Thread(target=wait_out_sweep, args=(str(root),)) for _ in range(2)]
        jobs[0].start()
        jobs[0].join(0.5)
        assert jobs[0].is_alive()  # no look since it asked
        mark.look()
        jobs[0].join(30)
        assert not jobs[0].is_alive()
        jobs[1].start()
        jobs[1].join(0.5)
        assert jobs[1].is_alive()  # the look before it asked is not one that saw its lease
    jobs[1].join(30)
    assert not jobs[1].is_alive() and not (root / SWEEP).exists()  # the sweep ended
    (root / SWEEP).write_text(json.dumps({"recheck_s": 30, "looks": 3}))
    os.utime(root / SWEEP, (time.time() - 100, time.time() - 100))  # a killed gc's mark, 3 renewals late
    wait_out_sweep(str(root))


def test_cache_cp_leaves_a_lease_the_source_kept_behind(tmp_path):
    """A complete entry can keep a lease (its job killed between the manifest and the lease's release): copied along,
    it replaced the copy's own lease at the destination, which then stopped renewing it and left it there, fresh,
    for the next copy to be refused by."""
    from preprocessing.cache.copy import copy_entry

    root, dest = tmp_path / "cache", tmp_path / "dest"
    write_entry(str(root / ENTRY), [2, 1])
    stale = {"token": "STALE", "store": STORE, "host": "elsewhere", "pid": 1, "renewed": 0}
    (root / ENTRY / "lease.json").write_text(json.dumps(stale))
    copied = copy_entry(str(root / ENTRY), str(dest), progress=False)
    assert (dest / ENTRY / "manifest.json").is_file() and not (dest / ENTRY / "lease.json").exists()
    assert copied.entry_files == len(list((dest / ENTRY).iterdir()))
    copy_entry(str(root / ENTRY), str(tmp_path / "again"), progress=False)  # and a second copy is not refused


def test_cache_cp_holds_a_lease_and_names_what_went_meanwhile_and_copies_no_path_out_of_a_store(tmp_path,
                                                                                               monkeypatch):
    """A copy runs for hours on a large entry: a gc at the destination took the items copied first (older than its
    grace, referenced by no manifest yet); an index naming `../x.npy` read and wrote out of both stores."""
    import pyarrow as pa

    import preprocessing.cache.copy as copy
    from preprocessing.cache.index import read_index, write_index

    root, dest = tmp_path / "cache", tmp_path / "dest"
    write_entry(str(root / ENTRY), [2, 1])
    real_stat, leases = copy.storage.stat_files, []

    def gc_meanwhile(uris):  # once every item is at the destination, before the manifest
        leases.append(json.loads((dest / ENTRY / "lease.json").read_text())["store"])
        next((dest / "features").glob("*/*/*.npy")).unlink()
        return real_stat(uris)

    monkeypatch.setattr(copy.storage, "stat_files", gc_meanwhile)
    with pytest.raises(RuntimeError, match="1 of the 3 store items copied or found at .* were removed meanwhile"):
        copy.copy_entry(str(root / ENTRY), str(dest), progress=False)
    monkeypatch.undo()
    assert leases == [STORE] and not (dest / ENTRY / "manifest.json").exists()
    assert not (dest / ENTRY / "lease.json").exists()  # let go when the copy ends, failed or not

    index = read_index(str(root / ENTRY), None)
    names = index["item_files"].to_pylist()
    names[0] = ["../../../secret.npy"]
    write_index(str(root / ENTRY), index.set_column(index.schema.get_field_index("item_files"), "item_files",
                                                    pa.array(names)))
    with pytest.raises(ValueError, match="'../../../secret.npy' is not the name of a feature store's item"):
        copy.copy_entry(str(root / ENTRY), str(tmp_path / "third"), progress=False)
    with pytest.raises(ValueError, match="is not the name of a feature store's item"):  # nor read: its digest was ""
        FeatureCache(str(root / ENTRY)).store.read("../../../secret.npy")
