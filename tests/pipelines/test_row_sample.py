"""The bounded sample of scored rows behind an eval run's MLflow table and its forecast plot."""

import random

import pytest

from pipelines.row_sample import RowSample


def sample(size: int, rows: list[dict], shards: int = 4) -> RowSample:
    kept = RowSample(size)
    for i in range(shards):
        kept.add(rows[i::shards])
    return kept


def test_a_sample_keeps_the_same_rows_whatever_order_the_shards_arrive_in():
    rows = [{"key": f"w{i:04d}", "value": i} for i in range(1000)]
    kept = sample(10, rows)
    shuffled = rows.copy()
    random.Random(0).shuffle(shuffled)
    assert sample(10, shuffled, shards=7).rows() == kept.rows()
    keys = [r["key"] for r in kept.rows()]
    assert len(keys) == 10 and keys == sorted(keys) and kept.seen == 1000
    assert max(keys) > "w0500" and min(keys) < "w0500"  # spread over the test set, not its first shards
    # every row while there are no more than the size, by key
    assert sample(10, shuffled[:7]).rows() == sorted(shuffled[:7], key=lambda r: r["key"])
    assert sample(0, rows).rows() == [] and sample(0, rows).seen == 1000
    with pytest.raises(ValueError, match="a sample of -1 rows"):
        RowSample(-1)


def test_rows_with_the_same_key_are_kept_without_comparing_them():
    kept = sample(2, [{"key": "a", "value": [1.0]}, {"key": "a", "value": [2.0]}, {"key": "a", "value": [3.0]}])
    assert len(kept.rows()) == 2
