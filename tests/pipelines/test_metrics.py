"""Every expected value here is worked out by hand in the comment beside it."""

import math

import numpy as np
import pytest

from pipelines.metrics.asr import character_error_rate, normalize_english, normalize_mandarin, word_error_rate
from pipelines.metrics.choice import choice_accuracy, extract_choice, parse_yes_no, pope_scores
from pipelines.metrics.forecast import ForecastErrors, denormalize, mae, mase_scale, mse, seasonal_naive
from pipelines.metrics.vqa import (best_constant_answer, exact_match, mean_exact_match, mean_vqa_accuracy,
                                  normalize_answer, vqa_accuracy)

# ---- VQA ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,normalized", [
    ("Two dogs.", "2 dogs"),  # number word -> digit, final period dropped
    ("2 dogs", "2 dogs"),
    ("1,000", "1000"),  # a comma between digits is deleted, not spaced: the number stays one word
    ("3.5", "3.5"),  # a period before a digit is a decimal point and stays
    ("it's", "it's"), ("its", "its"),  # "its" is a word, not a contraction missing its apostrophe
    ("dont", "don't"), ("Don't", "don't"),
    ("A dog", "dog"), ("the Red car", "red car"), ("an apple", "apple"), ("theater", "theater"),
    ("black-and-white", "black and white"),  # a mark inside a word becomes a space
    ("yes , it is", "yes it is"),  # a mark beside a space is deleted
    ("(left)", "left"), ("none", "0"), ("Ten\tapples ", "10 apples"),
])
def test_vqa_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize("matching,expected", [
    (0, 0.0),
    (1, 0.3),  # drop the match: 0/3 once; drop another: 1/3, nine times -> 3/10
    (2, 0.6),  # drop a match: 1/3, twice; drop another: 2/3, eight times -> (2/3 + 16/3)/10 = 18/30
    (3, 0.9),  # drop a match: 2/3, three times; drop another: min(3/3, 1) = 1, seven times -> (2 + 7)/10
    (4, 1.0),  # every subset of nine keeps at least three matches
])
def test_vqa_ten_annotator_rule(matching, expected):
    # the matching annotators wrote the number in words and digits; both must count
    answers = ["two", "2"] * (matching // 2) + ["2"] * (matching % 2) + ["3"] * (10 - matching)
    assert vqa_accuracy("Two.", answers) == pytest.approx(expected, abs=1e-12)


def test_the_best_constant_answer_is_the_one_scoring_best_by_the_annotators_rule():
    """Brute force over every answer given: the fast sum picks one scoring as high, spelled as an annotator did."""
    rng = np.random.default_rng(0)
    vocabulary = ["yes", "no", "2", "two", "red", "Red.", "a dog", "cat", ""]
    for _ in range(20):
        lists = [list(rng.choice(vocabulary, size=int(rng.integers(3, 11)))) for _ in range(int(rng.integers(1, 30)))]
        best = best_constant_answer(lists)
        brute = max(mean_vqa_accuracy([a] * len(lists), lists) for answers in lists for a in answers)
        assert mean_vqa_accuracy([best] * len(lists), lists) == pytest.approx(brute, abs=1e-12)
        assert any(best in answers for answers in lists)
    # "two" ("2") from 3 of 10 annotators on two questions (0.9 each) beats "yes", all 10 on one (1.0)
    others = ["red", "blue", "cat", "dog", "car", "tree", "sky"]
    assert best_constant_answer([["yes"] * 10, ["two"] * 3 + others, ["2"] * 3 + others[::-1]]) == "two"
    assert best_constant_answer([["", " "], [""]]) == ""  # blank answers only: nothing scores, and nothing raises


def test_vqa_aggregates_and_exact_match():
    # 0.6 (2 of 10) and 1.0 (all 10) -> 0.8
    assert mean_vqa_accuracy(["yes", "the cat"], [["yes"] * 2 + ["no"] * 8, ["cat"] * 10]) == pytest.approx(0.8)
    assert exact_match("The Cat.", "cat") == 1.0 and exact_match("cats", "cat") == 0.0
    assert mean_exact_match(["Two", "blue", "red"], ["2", "Blue!", "green"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        mean_exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("yes", [])


def test_an_empty_reply_is_wrong_even_against_an_answer_of_articles_only():
    """"A" (a choice letter) normalises to nothing, as did an unanswered sample's empty prediction: they matched,
    and so did "the"."""
    assert exact_match("", "A") == exact_match("   ", "A") == exact_match("the", "A") == 0.0
    assert exact_match("a", "A") == exact_match("(A)", "A") == 1.0
    assert exact_match("", "") == 0.0 and exact_match("a cat", "cat") == 1.0  # articles still go elsewhere
    assert vqa_accuracy("", ["A"] * 10) == 0.0 and vqa_accuracy("A.", ["A"] * 10) == 1.0


# ---- multiple choice and POPE ---------------------------------------------------------------------------

OPTIONS = ["dog", "cat", "dark red", "red"]


@pytest.mark.parametrize("response,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b)", "B"), (" B: cat", "B"),
    ("The answer is B", "B"), ("Answer: b)", "B"), ("answer is (C).", "C"),
    ("The answer is: B", "B"), ("The correct option is C.", "C"), ("My choice is: d)", "D"),
    ("B\nIt is the second one.", "B"), ("**C**", "C"), ("**C.** dark red", "C"),
    ("The answer is a cat", "B"),  # "a" is an article here: found through the option text instead
    ("A cat.", "B"),
    ("It is a dog.", "A"),
    ("dark red", "C"),  # the exact option wins over "red", which it contains
    ("red", "D"),
    ("I pick (D) for sure", "D"),
    ("Option B", "B"), ("I choose C because it is red.", "C"), ("I'd pick D", "D"), ("option A is right", "A"),
    ("I choose a cat", "B"),  # an article: found through the option text
    ("Option A's text says dog, so I choose B", "B"),  # "A's" names no pick
    ("Option A is wrong; option B is right.", None),  # two named: none
    ("I would not choose A. It is the cat.", "B"), ("I wouldn’t pick A: a cat", "B"),  # negated: the text decides
    ("Select A, B, C or D: the cat", "B"), ("I can pick A or B", None),  # a list of letters names none
    ("E", None),  # there is no fifth option
    ("a bird", None), ("dog or cat", None),
    ("It is dark red.", "C"), ("The answer is dark red.", "C"),  # "red" inside "dark red" is not named
    ("dark red or red", None),  # ... but standing on its own it is: two named, none
    ("The answer is A cat.", "B"), ("Answer: A cat", "B"),  # the capital is an article: the option text decides
    ("The answer is A because dogs bark.", "A"),  # no option text after it: the letter
    ("A: because the cat sleeps", "A"), ("A) the cat is not it", "A"),  # a letter with its mark is a letter
    ("Answer: A so not the cat", "A"), ("The answer is A since red is wrong", "A"),  # the option text later: no article
    ("A) dog B) cat C) dark red D) red. Answer: C", "C"),  # the options echoed, then the answer
    ("I think it's C", "C"), ("It is D.", "D"),
])
def test_extract_choice(response, letter):
    assert extract_choice(response, OPTIONS) == letter


def test_choice_accuracy_counts_unparsed_as_wrong():
    assert choice_accuracy(["B", "Answer: A", "no idea"], ["b", "C", "A"], [OPTIONS] * 3) == pytest.approx(1 / 3)


@pytest.mark.parametrize("response,parsed", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("There isn't a dog", "no"), ("yes", "yes"),
    ("Yes. But no.", "yes"),  # only the first sentence counts
    ("I am not sure", "no"),  # any negation means "no", as in POPE's script
    ("maybe", None),
])
def test_parse_yes_no(response, parsed):
    assert parse_yes_no(response) == parsed


def test_pope_scores():
    responses = ["Yes, there is.", "No.", "yes", "There isn't one.", "I can see a dog", "Yes", "Yes"]
    labels = ["yes", "yes", "no", "no", "yes", "yes", "yes"]
    # parsed: yes no yes no None yes yes -> TP = 3 (0, 5, 6), FP = 1 (2), TN = 1 (3); 5 positive labels
    scores = pope_scores(responses, labels)
    assert scores.accuracy == pytest.approx(4 / 7)
    assert scores.precision == pytest.approx(3 / 4)
    assert scores.recall == pytest.approx(3 / 5)
    assert scores.f1 == pytest.approx(2 / 3)  # 2 * 0.75 * 0.6 / 1.35
    assert scores.yes_ratio == pytest.approx(4 / 7)
    assert scores.unparsed == 1
    with pytest.raises(ValueError, match="'maybe'"):
        pope_scores(["yes"], ["maybe"])


# ---- ASR ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,normalized", [
    ("Twenty-one apples, please!", "21 apples please"),
    ("I have 21 apples.", "i have 21 apples"),
    ("one two three", "1 2 3"),  # digits read one by one stay separate numbers
    ("three hundred and five", "305"),
    ("two thousand and twenty four", "2024"),
    ("one apple and two pears", "1 apple and 2 pears"),  # this "and" is a word
    ("It costs 1,000 dollars", "it costs 1000 dollars"), ("one thousand dollars", "1000 dollars"),
    ("I don't know; it's 3.5 km.", "i do not know it is 3.5 km"),
    ("John's car WON'T   start", "johns car will not start"),
    (".5 litres", "0.5 litres"), ("a .5 b.", "a 0.5 b"),  # the point as punctuation read five
    ("5%", "5 percent"), ("five percent", "5 percent"),  # the % as punctuation read 5
    ("It costs $3.50.", "it costs 3.50 dollars"), ("three dollars", "3 dollars"),
    # digits and a scale word as the words read: "5 million" was two words to "five million"'s one number
    ("5 million people", "5000000 people"), ("five million people", "5000000 people"),
    ("$5 million", "5000000 dollars"), ("five million dollars", "5000000 dollars"), ("2.5 billion", "2500000000"),
    ("3 hundred", "300"), ("the 5 of us", "the 5 of us"),
])
def test_english_normalization(raw, normalized):
    assert normalize_english(raw) == normalized


def test_wer_is_corpus_level_after_normalization():
    references = ["The cat sat on the mat.", "Twenty one birds"]
    hypotheses = ["the cat sat on a mat", "21 bird"]
    # "the" -> "a" (1 of 6 words) and "birds" -> "bird" (1 of 2): 2 / 8, where a mean of rates gives 1/3
    result = word_error_rate(references, hypotheses)
    assert result.rate == pytest.approx(0.25)
    assert (result.substitutions, result.deletions, result.insertions, result.reference_length) == (2, 0, 0, 8)
    assert result.to_dict()["wer"] == pytest.approx(0.25) and "cer" not in result.to_dict()
    # one deletion and two insertions over 3 words
    assert word_error_rate(["a b c"], ["a c d e"]).rate == pytest.approx(1.0)


def test_mandarin_cer_ignores_spaces_and_punctuation():
    assert normalize_mandarin("今天 天气， 很好。") == "今天天气很好"
    references = ["今天 天气 很好。", "我爱北京"]
    hypotheses = ["今天天汽很好", "我 爱 北京 天安门"]
    # 气 -> 汽: 1 substitution of 6 characters; 天安门: 3 insertions after 4 characters -> 4 / 10
    result = character_error_rate(references, hypotheses, language="zh")
    assert result.metric == "cer" and result.rate == pytest.approx(0.4)
    assert (result.substitutions, result.insertions, result.reference_length) == (1, 3, 10)
    assert set(result.to_dict()) == {"cer", "substitutions", "deletions", "insertions", "reference_length"}


def test_english_cer_counts_spaces():
    # "hi bob" vs "hi bop": one substitution among 6 characters (the space counts)
    assert character_error_rate(["Hi, Bob!"], ["hi bop"], language="en").rate == pytest.approx(1 / 6)


def test_error_rate_refusals():
    with pytest.raises(ValueError, match="references are empty"):
        word_error_rate(["..."], ["a"])
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        character_error_rate(["a"], ["a"], language="fr")
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])


# ---- forecasting --------------------------------------------------------------------------------------------


def test_mse_mae_on_both_scales():
    assert mse([1, 2, 3], [1, 4, 0]) == pytest.approx(13 / 3)  # (0 + 4 + 9) / 3
    assert mae([1, 2, 3], [1, 4, 0]) == pytest.approx(5 / 3)
    prediction, target = [[0.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 1.0]]
    mean, std = [10.0, 20.0], [2.0, 3.0]
    assert denormalize(prediction, mean, std).tolist() == [[10.0, 12.0], [23.0, 23.0]]
    # normalised errors (-1, 0, 1, 0); original scale: times std 2 and 3 -> (-2, 0, 3, 0)
    assert ForecastErrors().add(prediction, target, std).result() == pytest.approx(
        {"mse_normalized": 0.5, "mae_normalized": 0.5, "mse": 13 / 4, "mae": 5 / 4})
    with pytest.raises(ValueError, match="differ in shape"):
        mse([1, 2], [1, 2, 3])


def test_seasonal_naive():
    assert seasonal_naive([1, 2, 3, 4, 5], horizon=5, period=2).tolist() == [4, 5, 4, 5, 4]
    assert seasonal_naive([[1, 2, 3], [7, 8, 9]], horizon=2).tolist() == [[3, 3], [9, 9]]
    with pytest.raises(ValueError, match="period must be in"):
        seasonal_naive([1, 2], horizon=2, period=3)


def mase(prediction, target, lookback, period: int = 1) -> float:
    return ForecastErrors(period).add(prediction, target, std=1.0, lookback=lookback).result()["mase"]


def test_mase_by_hand():
    lookback = [[1, 2, 4], [0, 0, 2]]
    # scales (period 1): mean(|2-1|, |4-2|) = 1.5 and mean(0, 2) = 1
    # MAEs: mean(|3-4|, |3-5|) = 1.5 and mean(|2-1|, |1-3|) = 1.5 -> MASE 1.0 and 1.5, mean 1.25
    assert mase([[3, 3], [2, 1]], [[4, 5], [1, 3]], lookback) == pytest.approx(1.25)
    seasonal = [1, 5, 2, 6, 3, 7]  # period-2 differences are all 1, so the scale is 1
    target = [4, 8, 4]
    naive = seasonal_naive(seasonal, horizon=3, period=2)  # (3, 7, 3): off by 1 everywhere
    assert mase(naive, target, seasonal, period=2) == pytest.approx(1.0)
    assert mase([4.5, 8.5, 4.5], target, seasonal, period=2) == pytest.approx(0.5)
    # a flat lookback has no scale: left out of the mean (here with the first window, MASE 1.0), NaN when alone
    assert mase([[3, 3], [5, 5]], [[4, 5], [5, 6]], [[1, 2, 4], [5, 5, 5]]) == pytest.approx(1.0)
    assert mase_scale([[1, 2, 4], [5, 5, 5]]).tolist() == [1.5, 0.0]
    alone = ForecastErrors().add([1, 1], [1, 2], std=1.0, lookback=[5, 5, 5]).result()
    assert math.isnan(alone["mase"]) and alone["windows_without_mase"] == 1
    with pytest.raises(ValueError, match="must be longer than the period 3"):
        mase([1, 1], [1, 2], [5, 5, 5], period=3)
    with pytest.raises(ValueError, match="one lookback window per forecast: got 1 for 2"):
        mase([[1, 1], [2, 2]], [[1, 2], [2, 2]], [1, 2, 3])
