"""Which cache each micro-batch comes from: by sample count, or by the phase's `mix` weights."""

from collections import Counter

import pytest

from pipelines.config import ConfigError, from_dict
from pipelines.train import TrainConfig
from pipelines.train_loop import micro_batches


class FakeCache:
    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def iter_samples(self, rank, world, seed, epoch):
        return ({"cache": self.name, "i": i} for i in range(self.n))


def drawn(mix, n=4000):
    caches = [FakeCache("a", 300), FakeCache("b", 100)]
    batches = micro_batches(caches, lambda samples: samples[0]["cache"], 2, 0, 1, seed=0, mix=mix)
    return Counter(next(batches) for _ in range(n))


def test_default_mix_follows_sample_counts():
    counts = drawn(None)
    assert 0.72 < counts["a"] / 4000 < 0.78


def test_mix_weights_override_sample_counts():
    counts = drawn([1, 3])
    assert 0.72 < counts["b"] / 4000 < 0.78


def config(**phase1):
    return {"name": "x", "caches": ["c1", "c2"], "model": {"backbone": {"path": "b"}, "projectors": {}},
            "phase1": {"lr": 1e-3, "steps": 1, "global_batch": 8, **phase1},
            "phase2": {"lr": 1e-3, "steps": 1, "global_batch": 8}}


@pytest.mark.parametrize("mix, message", [([1.0], "phase1.mix has 1 weights for 2 caches"),
                                          ([1.0, 0.0], "mix weights must be positive")])
def test_bad_mix_is_refused(mix, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, config(mix=mix))


def test_mix_accepted():
    assert from_dict(TrainConfig, config(mix=[2, 1])).phase1.mix == [2, 1]
