"""Which cache each micro-batch comes from: by sample count, or by the phase's `mix` weights."""

from collections import Counter
from itertools import count
from types import SimpleNamespace

import pytest

from pipelines.config import ConfigError, from_dict
from pipelines.train import TrainConfig
from pipelines.trainer import MicroBatches, check_position, samples_per_row


class FakeCache:
    def __init__(self, name: str, n: int):
        self.name, self.n, self.uri = name, n, f"fake/{name}"

    def __len__(self):
        return self.n

    @property
    def modality(self):
        return f"modality-{self.name}"

    def samples_of(self, rank, world):
        return self.n

    def iter_samples(self, rank, world, seed, epoch, start, epochs, prefetch):
        assert epochs is None  # one endless stream per cache
        return ({"cache": self.name, "i": i % self.n, "epoch": epoch + i // self.n} for i in count(start))


def fake_collator(too_long=lambda sample: False):
    """Like Collator(skip_bad_samples=True): keeps the samples that fit, names the others."""
    def collate(samples):
        kept = [x for x in samples if not too_long(x)]
        return SimpleNamespace(cache=samples[0]["cache"], sample_ids=[x["i"] for x in kept],
                               epochs=[x["epoch"] for x in kept],
                               skipped=[{"key": x["i"]} for x in samples if too_long(x)])
    return collate


def drawn(mix, n=4000):
    caches = [FakeCache("a", 300), FakeCache("b", 100)]
    batches = MicroBatches(caches, fake_collator(), 2, 0, 1, seed=0, mix=mix)
    pairs = [next(batches) for _ in range(n)]
    assert all(modality == f"modality-{batch.cache}" for modality, batch in pairs)
    return Counter(batch.cache for _, batch in pairs)


def test_over_long_samples_are_skipped_and_named_and_a_cache_of_nothing_else_fails_clearly():
    batches = MicroBatches([FakeCache("a", 40)], fake_collator(lambda x: x["i"] % 4 != 0), 2, 0, 1, seed=0)
    seen = [next(batches)[1] for _ in range(30)]
    assert all(batch.sample_ids and all(i % 4 == 0 for i in batch.sample_ids) for batch in seen)
    assert {s["key"] for batch in seen for s in batch.skipped} == {i for i in range(40) if i % 4}
    hopeless = MicroBatches([FakeCache("b", 10)], fake_collator(lambda x: True), 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="fake/b: every sample drawn is skipped"):
        next(hopeless)


def test_default_mix_follows_sample_counts():
    counts = drawn(None)
    assert 0.72 < counts["a"] / 4000 < 0.78


def test_mix_weights_override_sample_counts():
    counts = drawn([1, 3])
    assert 0.72 < counts["b"] / 4000 < 0.78


def config(**phase1):
    return {"name": "x", "caches": ["c1", "c2"], "model": {"backbone": {"path": "b"}, "projectors": {}},
            "phase1": {"lr": 1e-3, "steps": 1, "global_batch": 16, **phase1},
            "phase2": {"lr": 1e-3, "steps": 1, "global_batch": 16}}


@pytest.mark.parametrize("mix, message", [([1.0], "phase1.mix has 1 weights for 2 caches"),
                                          ([1.0, 0.0], "mix weights must be positive")])
def test_bad_mix_is_refused(mix, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, config(mix=mix))


def test_mix_accepted():
    assert from_dict(TrainConfig, config(mix=[2, 1])).phase1.mix == [2, 1]


def test_a_phase_reads_its_own_caches_and_the_config_lists_every_cache_read():
    """What the demo, the benchmarks' cache copies and the experiments' checks take as the config's inputs."""
    train = from_dict(TrainConfig, config(caches=["c3", "c1"]))
    assert train.phase_caches(train.phase1) == ["c3", "c1"] and train.phase_caches(train.phase2) == ["c1", "c2"]
    assert train.read_caches() == ["c3", "c1", "c2"]


def test_a_collections_weight_is_spread_over_its_entries_by_their_sample_counts():
    """`mix` gives a weight per configured entry; a collection's encode YAML is an entry per folder, drawn from as
    one cache of them all: its weight shared by sample counts (here 30 and 10 samples of weight 1; 10 of weight 3)."""
    from pipelines.caches import spread_mix

    assert spread_mix([3, 1], [["single"], ["folder-a", "folder-b"]], [10, 30, 10]) == [3, 0.75, 0.25]
    with pytest.raises(ValueError, match="empty: no sample to draw with weight 2"):
        spread_mix([2], [["empty"]], [0])
    with pytest.raises(ValueError):  # a weight per configured entry, no more, no fewer
        spread_mix([1], [["a"], ["b"]], [1, 1])
    with pytest.raises(ValueError, match="3 sample counts for 2 caches"):
        spread_mix([1, 1], [["a"], ["b"]], [1, 1, 1])


def test_collection_entries_smaller_than_the_workers_are_left_out_of_the_draw_and_never_opened():
    """Each worker takes samples of its own from a cache drawn: a collection's entry of fewer samples than workers
    (a small dataset's folder) gets weight 0 and its stream is never started; a cache named alone that small is a
    config error, named before any work."""
    from pipelines.caches import draw_weights, too_small

    groups = [["single"], ["a", "b", "c", "d"]]
    assert too_small(groups, [8, 3, 0, 20, 7], world=8) == ["a", "d"]
    assert too_small(groups, [8, 3, 0, 20, 7], world=1) == []
    with pytest.raises(ValueError, match="single: 5 samples for 8 workers"):
        too_small(groups, [5, 3, 0, 20, 7], world=8)
    # by sample counts, or the configured mix spread over the entries still drawn; an empty entry is never drawn
    assert draw_weights(None, groups, [8, 3, 0, 20, 7], world=8) == ([8, 0, 0, 20, 0], ["a", "d"])
    assert draw_weights([1, 3], groups, [8, 3, 0, 20, 7], world=8) == ([1, 0, 0, 3, 0], ["a", "d"])
    assert draw_weights(None, groups, [8, 3, 0, 20, 7], world=1) == ([8, 3, 0, 20, 7], [])
    with pytest.raises(ValueError, match="no cache holds a sample to draw for 8 workers"):
        draw_weights(None, [["a"], ["b", "c"]], [0, 0, 0], world=8)
    for mix in (None, [1, 3]):  # a collection all of whose entries are too small is named, mix or none
        with pytest.raises(ValueError, match="a ...: every entry of this collection holds fewer samples than the 8"):
            draw_weights(mix, groups, [8, 3, 0, 2, 7], world=8)

    class TooSmall(FakeCache):
        def samples_of(self, rank, world):
            raise AssertionError("a cache left out of the draw is read")

    batches = MicroBatches([FakeCache("a", 30), TooSmall("b", 3)], fake_collator(), 2, 0, 8, seed=0, mix=[30, 0])
    assert {next(batches)[1].cache for _ in range(200)} == {"a"}


def test_a_stream_built_from_a_position_continues_exactly_where_the_first_stood():
    def stream(position=None):
        caches = [FakeCache("a", 15), FakeCache("b", 7)]
        return MicroBatches(caches, fake_collator(lambda x: x["i"] % 5 == 1), 2, 0, 1, seed=4, position=position)

    first = stream()
    for _ in range(23):  # past several epochs of both caches, with over-long samples skipped on the way
        next(first)
    position = first.position()
    assert position["draws"] >= 23 and position["taken"][0] > 15 and position["taken"][1] > 7  # past an epoch
    resumed = stream(position)
    assert resumed.position() == position
    for _ in range(40):
        (m1, b1), (m2, b2) = next(first), next(resumed)
        assert (m1, b1.sample_ids, b1.epochs, b1.skipped) == (m2, b2.sample_ids, b2.epochs, b2.skipped)
    with pytest.raises(ValueError, match="a data position for 2 caches cannot resume 1"):
        MicroBatches([FakeCache("a", 15)], fake_collator(), 2, 0, 1, seed=4, position=position)


class FakePackingCollator:
    """Like Collator(max_length, skip_bad_samples=True) for packing: sample i is `length(i)` tokens long."""

    def __init__(self, max_length: int, length, kernel: int = 3):
        self.max_length, self.length = max_length, length
        self.config = SimpleNamespace(projectors={"image": SimpleNamespace(kernel=kernel, stride=2)})

    def encode_all(self, samples):
        kept = [SimpleNamespace(ids=[0] * self.length(x["i"]), sample=x) for x in samples
                if self.length(x["i"]) <= self.max_length]
        return kept, [{"key": x["i"]} for x in samples if self.length(x["i"]) > self.max_length]

    def pack(self, rows, skipped):
        samples = [e.sample for row in rows for e in row]
        return SimpleNamespace(rows=[[(e.sample["i"], len(e.ids)) for e in row] for row in rows], skipped=skipped,
                               sample_ids=[x["i"] for x in samples], epochs=[x["epoch"] for x in samples],
                               cache=samples[0]["cache"])


def packed_stream(caches, position=None, length=lambda i: (i * 7) % 13 + 1, micro=3):
    return MicroBatches(caches, FakePackingCollator(16, length), micro, 0, 1, seed=2, position=position, pack_buffer=10)


def test_packed_micro_batches_hold_full_rows_of_every_sample_once():
    """Rows of at most max_length tokens, first-fit decreasing within each buffer of 10 samples: over 3 epochs
    of 30 samples each one is packed once per epoch, none twice; the over-long one is skipped and named."""
    stream = packed_stream([FakeCache("a", 30)], length=lambda i: 17 if i == 4 else (i * 7) % 13 + 1)
    batches = []
    while stream.position()["taken"][0] < 90:  # until the 10th buffer (the 4th epoch) is read
        batch = next(stream)[1]
        batches.append(batch)
        assert len(batch.rows) == 3 and all(sum(n for _, n in row) <= 16 for row in batch.rows)
    seen = Counter((i, e) for b in batches for i, e in zip(b.sample_ids, b.epochs))
    assert set(seen.values()) == {1}
    assert {(i, e) for i, e in seen if e < 3} == {(i, e) for i in range(30) for e in range(3) if i != 4}
    # each named with the entry it is a key of
    assert [s for b in batches for s in b.skipped] == [{"key": 4, "entry": "a"}] * 4


def test_a_packed_stream_built_from_a_position_continues_exactly_where_the_first_stood():
    """Rows, epochs and over-long samples as the first stream's: the current buffer's over-long samples went
    out with its first row, before the position, and are not named again."""
    def length(i):
        return 17 if i % 5 == 3 else (i * 7) % 13 + 1

    first = packed_stream([FakeCache("a", 15), FakeCache("b", 7)], length=length)
    for _ in range(17):  # inside a buffer, past an epoch of both caches
        next(first)
    position = first.position()
    assert position["draws"] == 17 and position["taken"][0] % 10 == 0 and 0 < sum(position["rows"])
    resumed = packed_stream([FakeCache("a", 15), FakeCache("b", 7)], position, length=length)
    assert resumed.position() == position
    skipped = 0
    for _ in range(30):
        (m1, b1), (m2, b2) = next(first), next(resumed)
        assert (m1, b1.rows, b1.epochs, b1.skipped) == (m2, b2.rows, b2.epochs, b2.skipped)
        skipped += len(b1.skipped)
    assert skipped >= 5
    with pytest.raises(ValueError, match="saved with packing on cannot resume a run with packing off"):
        MicroBatches([FakeCache("a", 15), FakeCache("b", 7)], fake_collator(), 2, 0, 1, seed=2, position=position)


def test_a_cache_of_nothing_but_over_long_samples_fails_clearly_when_packing():
    with pytest.raises(ValueError, match="fake/b: every sample drawn is skipped"):
        next(packed_stream([FakeCache("b", 10)], length=lambda i: 17))


def test_packed_caches_are_read_at_the_rate_of_their_sample_weights():
    """Two caches of 300 samples, of 2 and of 9 tokens in rows of 16 packed from buffers of 10: a row holds 5 of one
    (a buffer's 20 tokens make 2 rows), 1 of the other. Drawn by sample count, the short one's samples were read 5
    times as often; drawn per `samples_per_row`, as often."""
    lengths = {"short": 2, "long": 9}
    caches = [FakeCache("short", 300), FakeCache("long", 300)]
    per_row = [samples_per_row([lengths[c.name]] * len(c), 16, 10, seed=0) for c in caches]
    assert per_row == [5.0, 1.0]
    for weights, ratio in (([300, 300], 5.0), ([300 / per_row[0], 300 / per_row[1]], 1.0)):
        stream = MicroBatches(caches, LengthsByCache(16, lengths), 3, 0, 1, seed=2, mix=weights, pack_buffer=10)
        read = Counter()
        for _ in range(600):
            batch = next(stream)[1]
            read[batch.cache] += len(batch.sample_ids)
        assert read["short"] / read["long"] == pytest.approx(ratio, rel=0.25)


class LengthsByCache(FakePackingCollator):
    """Every sample of a cache one length."""

    def __init__(self, max_length: int, lengths: dict[str, int]):
        super().__init__(max_length, None)
        self.lengths = lengths

    def encode_all(self, samples):
        return [SimpleNamespace(ids=[0] * self.lengths[x["cache"]], sample=x) for x in samples], []


def test_a_pack_buffer_larger_than_the_workers_share_holds_each_sample_once():
    """A cache of 7 samples and buffers of 10: a buffer of the worker's 7 samples, where 10 held 3 of them twice."""
    stream = packed_stream([FakeCache("b", 7)], length=lambda i: 3)
    for _ in range(5):
        next(stream)
        packed = [e.sample["i"] for row in stream.packers[0].rows for e in row]
        assert sorted(packed) == list(range(7))


def test_a_position_is_refused_by_a_run_whose_seed_or_packing_would_point_its_counts_at_other_samples():
    """Counts of draws, samples and rows mean a place only under the same seed (the draws, each epoch's shuffle) and,
    packing, the same buffer, max_length and compression: another packs that buffer into other rows (fewer than
    were handed out: an IndexError at the first draw), or trains samples twice and skips others."""
    caches = lambda: [FakeCache("a", 15), FakeCache("b", 7)]  # noqa: E731
    first = packed_stream(caches())
    for _ in range(5):
        next(first)
    position = first.position()
    assert position["order"] == {"seed": 2, "pack_buffers": [10, 7], "max_length": 16, "compression": {
        "image": [3, 2]}}
    for changed in (dict(seed=3), dict(pack_buffer=8), dict(collator=FakePackingCollator(20, lambda i: 5)),
                    dict(collator=FakePackingCollator(16, lambda i: 5, kernel=4))):
        args = {"collator": FakePackingCollator(16, lambda i: 5), "seed": 2, "pack_buffer": 10, **changed}
        with pytest.raises(ValueError, match="a data position saved with .* cannot resume a run with .* start the "
                                             "phase afresh"):
            MicroBatches(caches(), args["collator"], 3, 0, 1, seed=args["seed"], position=position,
                         pack_buffer=args["pack_buffer"])
    unpacked = MicroBatches(caches(), fake_collator(), 2, 0, 1, seed=4)
    next(unpacked)
    with pytest.raises(ValueError, match="saved with {'seed': 4} cannot resume a run with {'seed': 5}"):
        MicroBatches(caches(), fake_collator(), 2, 0, 1, seed=5, position=unpacked.position())
    del position["order"]  # saved before it was recorded: taken as it is
    assert packed_stream(caches(), position).position()["taken"] == position["taken"]


def test_a_cache_drawn_in_one_run_only_changes_no_order_and_the_driver_checks_orders_before_workers_start(capsys):
    """A cache the mix leaves out (weight 0) took nothing: its buffer is no part of the order. The driver refuses a
    checkpoint saved in another order from its metadata, before the MLflow run, the caches and Ray start."""
    from pipelines.train import check_resumable
    from pipelines.train_config import PhaseConfig

    caches = lambda: [FakeCache("a", 15), FakeCache("b", 7)]  # noqa: E731
    collator = FakePackingCollator(16, lambda i: 5)
    first = MicroBatches(caches(), collator, 3, 0, 1, seed=2, mix=[1, 0], pack_buffer=10)
    next(first)
    position = first.position()
    assert position["order"]["pack_buffers"] == [10, None]
    both = MicroBatches(caches(), collator, 3, 0, 1, seed=2, mix=[1, 1], position=position, pack_buffer=10)
    assert both.position()["taken"] == position["taken"]
    assert "predates" not in capsys.readouterr().out  # a fresh stream has no position to check

    saved = {"step": 1, "entries": position["entries"], "epochs": [position["epoch"]], "orders": [position["order"]]}
    plan = SimpleNamespace(hp=PhaseConfig(lr=1e-3, steps=10, global_batch=8), opened=caches(), weights=[1, 0],
                           model=collator.config, destination="out")
    config = SimpleNamespace(scaling=SimpleNamespace(workers=1), seed=2, packing=True, pack_buffer=10, max_length=16)
    check_resumable(saved, "ckpt", plan, 1, config)
    with pytest.raises(ValueError, match="a data position saved with .*'seed': 2.* cannot resume a run with "
                                         ".*'seed': 3"):
        check_resumable(saved, "ckpt", plan, 1, SimpleNamespace(**{**vars(config), "seed": 3}))


def test_a_position_saved_over_other_epochs_is_refused_and_one_without_them_is_taken_with_a_warning(capsys):
    """A count of samples taken is a place in the data only over the same epochs: an entry encoded again (15
    samples, then 16) would resume elsewhere, silently."""
    first = MicroBatches([FakeCache("a", 15)], fake_collator(), 2, 0, 1, seed=4)
    for _ in range(5):
        next(first)
    position = first.position()
    assert position["epoch"] == [15] and position["entries"] == ["a"]
    with pytest.raises(ValueError, match="a: a data position saved when worker 0's epoch held 15 of its samples "
                                         "cannot resume one of 16"):
        MicroBatches([FakeCache("a", 16)], fake_collator(), 2, 0, 1, seed=4, position=position)
    with pytest.raises(ValueError, match="saved over the entry a cannot resume a run that reads b in its place"):
        MicroBatches([FakeCache("b", 15)], fake_collator(), 2, 0, 1, seed=4, position=position)
    with pytest.raises(ValueError, match="a data position saved over 1 entries cannot resume a run over 2"):
        check_position(position, [15, 7], ["a", "b"], 0)
    unweighted = MicroBatches([FakeCache("a", 16)], fake_collator(), 2, 0, 1, seed=4, mix=[0])
    assert unweighted.epoch == [0]  # never drawn: any epoch it had before is no place to resume from
    check_position(unweighted.position(), [15], ["a"], 0)  # nor one it has now, once drawn
    del position["epoch"], position["entries"]  # saved before the entries and epochs were recorded
    resumed = MicroBatches([FakeCache("a", 15)], fake_collator(), 2, 0, 1, seed=4, position=position)
    assert next(resumed)[1].sample_ids == next(first)[1].sample_ids
    assert "the data position predates its record of the entries and epochs" in capsys.readouterr().out
