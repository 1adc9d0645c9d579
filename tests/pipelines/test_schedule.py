import pytest

from pipelines.schedule import warmup_cosine


@pytest.mark.parametrize("warmup", [0, 2])
def test_the_peak_is_reached_once_and_the_floor_at_the_last_step(warmup):
    multipliers = [warmup_cosine(step, 10, warmup, 0.1) for step in range(10)]
    assert multipliers[:warmup] == [(s + 1) / warmup for s in range(warmup)]
    decay = multipliers[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # no step held at the peak
    assert max(multipliers) == pytest.approx(1.0, abs=0.03) and multipliers.count(max(multipliers)) == 1
    assert multipliers[-1] == pytest.approx(0.1)
