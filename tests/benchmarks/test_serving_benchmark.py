"""benchmarks/serving.py's choice of requests and its scores, without a server: item counts of 0 take none, a
language without clips is shown as such, not a failure after all the serving work."""

import pytest

from benchmarks.serving import last, score


def test_a_count_of_0_takes_no_items_and_others_the_last_ones():
    assert last([1, 2, 3], 0) == [] and last([1, 2, 3], 2) == [2, 3] and last([1, 2, 3], 5) == [1, 2, 3]


def test_the_speech_score_names_a_language_without_clips():
    rows = [{"language": "zh", "reference": "你好", "served": "你好"}]
    assert score("audio", rows) == ("WER en / CER zh", "— / 0.000")
    rows.append({"language": "en", "reference": "one two", "served": "one three"})
    assert score("audio", rows) == ("WER en / CER zh", "0.500 / 0.000")
    assert score("series", [{"served": [1.0, 3.0], "reference": [1.0, 1.0]}])[1] == pytest.approx(2.0)
