"""Each evaluation task's scoring and trivial baseline on hand-made predictions, its plots, and its settings."""

from typing import get_args

import numpy as np
import pytest

from modrwkv.conversation import Sample, Turn
from pipelines.config import from_dict
from pipelines.eval_tasks import ASR, TASKS, VQA, Forecast, TaskName
from pipelines.evaluate import EvalConfig


def tally(task, rows: list[dict]):
    running = task.tally()
    running.add(rows)
    return running


def test_vqa_scores_exact_match_beside_the_majority_answer_and_plots_a_confusion_matrix(tmp_path):
    rows = [{"prediction": p, "reference": r}
            for p, r in [("Seven.", "seven"), ("one", "two"), ("two", "Two"), ("the four", "four")]]
    metrics, baselines = VQA().score(rows)
    # the majority answer told apart as the metric tells them ("two" and "Two" are one answer, 2 of 4)
    assert metrics == {"accuracy": 0.75} and baselines == {"accuracy": 0.5}
    # the matrix compares answers as the metric does: its diagonal is the accuracy's count
    labels, counts = VQA.confusion(rows)
    assert labels == ["2", "4", "7"]  # VQAv2's normalisation writes numbers as digits
    assert counts.tolist() == [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]] and np.trace(counts) == 0.75 * len(rows)
    assert VQA().plots(tally(VQA(), rows), tmp_path) == [tmp_path / "confusion_matrix.png"]
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    # a choice letter (normalised to nothing) and a skipped sample's empty answer: on the diagonal before, though
    # accuracy counted the empty answer wrong
    choices = [{"prediction": "A", "reference": "A"}, {"prediction": "", "reference": "A"},
               {"prediction": "B", "reference": "B"}]
    assert VQA().score(choices)[0]["accuracy"] == pytest.approx(2 / 3)
    labels, counts = VQA.confusion(choices)
    assert labels == ["a", "b"] and counts.tolist() == [[1, 0, 1], [0, 1, 0]] and np.trace(counts) == 2
    one_answer = [{"prediction": "yes", "reference": "yes"}] * 2  # no closed set of answers to cross
    assert VQA().plots(tally(VQA(), one_answer), tmp_path / "none") == []
    # choice letters: "A" normalises to nothing, yet the majority answer "A" is no empty reply
    letters = [{"prediction": "", "reference": r} for r in ("The", "A", "A", "B")]  # "The" and "A" are two answers
    assert VQA().score(letters) == ({"accuracy": 0.0}, {"accuracy": 0.5})


def test_vqa_with_the_annotators_answers_scores_vqav2_accuracy_too(capsys):
    """min(#annotators who gave the answer / 3, 1) over the leave-one-out subsets: 4 of 10 ("a cat!" is "cat" once
    normalised) give 1.0, 1 of 10 gives 0.3;
    exact match against the reference stays beside it. Some samples without answers: no vqa_accuracy, said so."""
    answers = ["cat"] * 3 + ["dog"] * 6 + ["a cat!"]
    rows = [{"prediction": "Cat", "reference": "dog", "answers": answers},
            {"prediction": "bird", "reference": "dog", "answers": ["bird"] + ["dog"] * 9}]
    metrics, baselines = VQA().score(rows)
    assert metrics == {"accuracy": 0.0, "vqa_accuracy": pytest.approx((1.0 + 0.3) / 2)}
    assert baselines == {"accuracy": 1.0, "vqa_accuracy": 1.0}  # "dog" to both: 6 and 9 of 10 annotators
    skewed = [{**rows[0], "reference": "cat"}, {**rows[1], "reference": "cat"}, {**rows[1], "reference": "dog"}]
    # the most frequent reference ("cat") scores 1/3 by the annotators' rule, "dog" 1.0: each metric's own best answer
    assert VQA().score(skewed)[1] == {"accuracy": pytest.approx(2 / 3), "vqa_accuracy": 1.0}
    metrics, _ = VQA().score(rows + [{"prediction": "dog", "reference": "dog"}])
    assert "vqa_accuracy" not in metrics and "2 of 3 samples carry annotators' answers" in capsys.readouterr().out


def test_vqa_scores_multiple_choice_by_the_letter_named_beside_the_most_frequent_right_letter(capsys):
    """Multiple-choice questions (each row's options, the reference a letter): `choice_accuracy` counts the option
    a reply names, by its letter or its text; its baseline is the constant letter right most often."""
    options = ["red", "green", "blue"]
    said = [("B", "B"), ("The answer is (A)", "A."), ("blue", "(C)"), ("green", "B"), ("I don't know", "B")]
    rows = [{"prediction": p, "reference": r, "options": options} for p, r in said]
    metrics, baselines = VQA().score(rows)
    assert metrics["choice_accuracy"] == pytest.approx(4 / 5) and baselines["choice_accuracy"] == pytest.approx(3 / 5)
    assert metrics["choice_unparsed"] == 1 and baselines["choice_unparsed"] == 0  # "I don't know"
    # an empty reply (a skipped sample's) names no option, not one without a word (">")
    symbols = [{"prediction": "", "reference": "The answer is A.", "options": [">", "<"]}]
    assert VQA().score(symbols)[0] == {"accuracy": 0.0, "choice_accuracy": 0.0, "choice_unparsed": 1}
    metrics, _ = VQA().score(rows + [{"prediction": "B", "reference": "B"}])
    assert "choice_accuracy" not in metrics
    assert "5 of 6 samples are multiple-choice questions" in capsys.readouterr().out
    # the options travel from the cached sample into its row, a skipped sample's too
    sample = Sample("q1", "image", [Turn("user", "<image>\nWhich?"), Turn("assistant", "B")], meta={"options": options})
    assert VQA().unanswered(sample) == {"prediction": "", "stopped": True, "reference": "B", "options": options}


def test_vqa_on_yes_no_questions_scores_pope_beside_always_yes(capsys):
    """Every reference yes or no (POPE): its accuracy, precision, recall and F1 of "yes", yes ratio and unparsed
    replies, beside the answer "yes" to every question (F1 2p / (1 + p) at a share p of yes)."""
    rows = [{"prediction": p, "reference": r}
            for p, r in [("Yes.", "yes"), ("No, there is not.", "No"), ("yes", "no"), ("maybe", "yes")]]
    metrics, baselines = VQA().score(rows)
    assert metrics["pope_accuracy"] == 0.5 and metrics["pope_precision"] == 0.5 and metrics["pope_recall"] == 0.5
    assert metrics["pope_f1"] == 0.5 and metrics["pope_yes_ratio"] == 0.5 and metrics["pope_unparsed"] == 1
    assert baselines["pope_f1"] == pytest.approx(2 / 3) and baselines["pope_yes_ratio"] == 1.0
    assert "POPE's scores too (pope_*; 1 replies neither yes nor no" in capsys.readouterr().out
    assert "pope_f1" not in VQA().score(rows + [{"prediction": "a cat", "reference": "cat"}])[0]


def test_asr_scores_each_language_beside_the_empty_transcript(tmp_path):
    rows = [{"prediction": "one two", "reference": "one two three", "language": "en"},
            {"prediction": "四八", "reference": "四八八", "language": "zh"}]
    metrics, baselines = ASR().score(rows)
    assert metrics == {"wer_en": pytest.approx(1 / 3), "cer_zh": pytest.approx(1 / 3)}
    assert baselines == {"wer_en": 1.0, "cer_zh": 1.0}
    assert ASR().score(rows[:1]) == ({"wer_en": pytest.approx(1 / 3)}, {"wer_en": 1.0})  # no Mandarin, no CER
    assert ASR().plots(tally(ASR(), rows), tmp_path) == []
    others = [{"prediction": "un", "reference": "un", "language": "fr"}, {"prediction": "x", "reference": "y"}]
    metrics, _ = ASR().score(rows + others)  # scored where it can be, the rest counted, never dropped unsaid
    assert metrics == {"wer_en": pytest.approx(1 / 3), "cer_zh": pytest.approx(1 / 3), "rows_unscored": 2}
    with pytest.raises(ValueError, match=r"no row to score: .* the rows have \['None', 'fr'\]"):
        ASR().score(others)


def test_forecast_scores_beside_seasonal_naive_and_plots_forecasts(tmp_path):
    lookback = [0.0, 1.0, 2.0, 1.0, 2.0, 3.0]  # seasonal naive (period 3) continues with 1, 2
    rows = [{"key": "w0", "prediction": [1.0, 2.0], "reference": [1.0, 3.0], "lookback": lookback,
             "mean": 10.0, "std": 2.0}]
    metrics, baselines = Forecast(season=3).score(rows)
    assert metrics == baselines  # the forecast is the seasonal-naive one
    assert metrics["mse_normalized"] == 0.5 and metrics["mse"] == 2.0  # errors 0 and 1; on the original scale 0 and 2
    assert metrics["mase"] == 0.5  # MAE 0.5 over the lookback's mean |y_t - y_(t-3)| = 1
    exact = [{**rows[0], "prediction": [1.0, 3.0]}]
    metrics, naive = Forecast(season=1).score(exact)  # naive (period 1) repeats 3: errors 2 and 0
    assert metrics["mse"] == 0.0 and naive["mse_normalized"] == 2.0 and naive["mse"] == 8.0
    flat = {**rows[0], "key": "w1", "lookback": [4.0] * 6, "prediction": [4.0, 4.0], "reference": [4.0, 6.0]}
    metrics, _ = Forecast(season=3).score(rows + [flat])  # a stuck sensor: MSE counts it, MASE cannot
    assert metrics["mase"] == 0.5 and metrics["windows_without_mase"] == 1 and metrics["mse_normalized"] == 1.25
    assert Forecast().plots(tally(Forecast(), rows), tmp_path) == [tmp_path / "forecast_vs_truth.png"]
    assert (tmp_path / "forecast_vs_truth.png").stat().st_size > 0


def test_forecast_errors_on_each_series_training_scale_when_the_cache_has_it():
    """The Time-Series-Library's tables report errors on each series standardised by its training range: original
    errors 0 and 2 over a train std of 4 are 0 and 0.5; a series constant in training has no such scale."""
    row = {"key": "w0", "prediction": [1.0, 2.0], "reference": [1.0, 3.0], "lookback": [0.0, 1.0, 2.0, 3.0],
           "mean": 10.0, "std": 2.0, "train_std": 4.0}
    constant = {**row, "key": "w1", "prediction": [5.0, 5.0], "train_std": 0.0}
    metrics, naive = Forecast().score([row, constant])
    assert metrics["mse_standardized"] == 0.125 and metrics["mae_standardized"] == 0.25
    assert metrics["windows_without_train_scale"] == 1
    assert naive["mse_standardized"] == ((3.0 * 2 - 1.0 * 2) / 4) ** 2 / 2  # naive repeats 3: errors 4, 0 orig.
    assert "mse_standardized" not in Forecast().score([{**row, "train_std": None}])[0]  # an older cache


def test_forecasts_scored_shard_by_shard_are_scored_as_the_whole_test_set(tmp_path):
    """The paper's ECL and Traffic test sets hold millions of windows: the driver adds each shard's rows to running
    sums as they arrive. Any split of the rows gives the figures of the whole, worked out here on the arrays; flat
    lookbacks and series constant in training are left out and counted alike; the plot shows the same windows
    whatever the shards' order."""
    rng = np.random.default_rng(0)
    n, horizon = 23, 5
    prediction, target = rng.normal(size=(n, horizon)), rng.normal(size=(n, horizon))
    lookback, std, train_std = rng.normal(size=(n, 12)), rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, n)
    lookback[[3, 17]], train_std[[4, 9, 20]] = 1.0, 0.0
    rows = [{"key": f"w{i:02d}", "prediction": prediction[i].tolist(), "reference": target[i].tolist(),
             "lookback": lookback[i].tolist(), "mean": 1.0, "std": std[i], "train_std": train_std[i]} for i in range(n)]
    whole = Forecast(season=2).score(rows)
    shards = Forecast(season=2).tally()
    for part in (rows[:1], rows[1:8], [], rows[8:16], rows[16:]):
        shards.add(part)
    assert shards.result()[0] == pytest.approx(whole[0]) and shards.result()[1] == pytest.approx(whole[1])
    metrics, naive = whole
    assert metrics["windows_without_mase"] == 2 and metrics["windows_without_train_scale"] == 3
    assert "windows_without_mase" not in naive  # the counts are the model's; the baseline's are the same windows
    scaled, errors = np.abs(lookback[:, 2:] - lookback[:, :-2]).mean(1), (prediction - target) * std[:, None]
    moving = scaled > 0
    assert metrics["mase"] == pytest.approx(np.mean(np.abs(prediction - target).mean(1)[moving] / scaled[moving]))
    assert metrics["mse"] == pytest.approx(np.mean(errors**2))
    trained = train_std > 0
    assert metrics["mae_standardized"] == pytest.approx(np.mean(np.abs(errors[trained] / train_std[trained, None])))
    naive_errors = (lookback[:, [-2, -1, -2, -1, -2]] - target) * std[:, None]
    assert naive["mse"] == pytest.approx(np.mean(naive_errors**2))
    reversed_shards = Forecast(season=2).tally()
    for part in (rows[16:], rows[8:16], rows[:8]):
        reversed_shards.add(part)
    assert reversed_shards.shown.rows() == shards.shown.rows() and len(shards.shown.rows()) == 4
    assert Forecast().plots(shards, tmp_path) == [tmp_path / "forecast_vs_truth.png"]
    # a shard from a cache without training scales: no standardized figures for the whole
    shards.add([{**rows[0], "train_std": None}])
    assert not {"mse_standardized", "windows_without_train_scale"} & set(shards.result()[0])


def test_forecasts_in_one_pass_need_lookbacks_of_one_length():
    """A cache's windows share their lookback length (one encode job cuts them); windows of two lengths in one
    batch are an error that names where, not a padded guess."""
    from types import SimpleNamespace

    import torch

    from modrwkv.conversation import Sample

    model = SimpleNamespace(backbone=SimpleNamespace(emb=SimpleNamespace(weight=torch.zeros(1))))
    samples = [Sample(f"w{n}", "series", [], lookback=np.zeros(n, np.float32)) for n in (16, 24)]
    with pytest.raises(ValueError, match=r"the windows from w16 on have lookbacks of \[16, 24\] steps"):
        Forecast(batch_size=2).answer(model, None, samples, [[1, 2], [1, 2]], [[], []])


def test_tasks_are_named_by_the_eval_config_and_take_their_settings_from_it():
    assert set(TASKS) == set(get_args(TaskName))
    assert {name: task.modality for name, task in TASKS.items()} == {"vqa": "image", "asr": "audio",
                                                                      "forecast": "series"}
    config = {"checkpoint": "m", "cache": "c", "max_new_tokens": 4, "season": 52}
    assert TASKS["forecast"].from_config(from_dict(EvalConfig, {**config, "task": "forecast"})) == Forecast(season=52)
    assert TASKS["asr"].from_config(from_dict(EvalConfig, {**config, "task": "asr"})) == ASR(max_new_tokens=4)


def test_eval_quantization_is_checked_at_load():
    config = {"checkpoint": "m", "cache": "c", "task": "vqa"}
    assert from_dict(EvalConfig, config).quantize == "none"
    assert from_dict(EvalConfig, {**config, "quantize": "int8"}).quantize == "int8"
    with pytest.raises(ValueError, match="quantize"):
        from_dict(EvalConfig, {**config, "quantize": "int4"})


def stop_at(token: int):
    """The World tokenizer with `token` as the turn's end: the tasks stop at "\n\n", which a random model never says."""
    from modrwkv.tokenizer import WorldTokenizer

    class StopAt(WorldTokenizer):
        def encode(self, text, allow_special=False):
            return [token] if text == "\n\n" else super().encode(text, allow_special)

    return StopAt()


def audio_sample(i: int, frames: int, language: str):
    from modrwkv.conversation import Turn
    from modrwkv.conversation import Sample
    from preprocessing.readers.asr import PROMPTS

    turns = [Turn("user", f"<audio>\n{PROMPTS[language]}"), Turn("assistant", "one two")]
    features = np.random.default_rng(i).standard_normal((frames, 16)).astype(np.float32)
    return Sample(f"a{i}", "audio", turns, items=[features], meta={"language": language})


@pytest.mark.parametrize("quantize", ["none", pytest.param("int8", marks=pytest.mark.slow)])
def test_batched_decoding_gives_the_rows_of_one_at_a_time_decoding(quantize):
    """Prompts of different lengths (two languages, 3 to 14 audio frames) padded into batches of 4 (the last
    one partial), rows stopping at different steps: the same rows as decoding each sample alone."""
    from modrwkv import quantize as quantize_model
    from modrwkv.tokenizer import WorldTokenizer
    from tests.modrwkv.test_multimodal import tiny_model

    model = quantize_model(tiny_model(seed=4), quantize)
    samples = [audio_sample(i, frames, language)
               for i, (frames, language) in enumerate([(3, "en"), (14, "zh"), (7, "en"), (9, "zh"), (5, "en"),
                                                       (11, "en")])]
    free = ASR(max_new_tokens=8, batch_size=1).predict(model, stop_at(-1), samples)
    stop = WorldTokenizer().encode(free[0]["prediction"])[2]  # the first row says it third
    tokenizer = stop_at(stop)
    alone = ASR(max_new_tokens=8, batch_size=1).predict(model, tokenizer, samples)
    batched = ASR(max_new_tokens=8, batch_size=4).predict(model, tokenizer, samples)
    assert batched == alone
    lengths = {len(tokenizer.encode(r["prediction"])) for r in alone}
    assert len(lengths) > 1 and max(lengths) >= 6  # some rows stopped early, others decoded on


def test_an_answer_ends_where_its_text_ends_the_turn_even_inside_a_token():
    """"。\n\n" is tokenized "。\n", "\n": no "\n\n" token, yet the answer's turn ends there."""
    from modrwkv.tokenizer import WorldTokenizer
    from tests.modrwkv.test_multimodal import tiny_model

    model, plain = tiny_model(seed=4), WorldTokenizer()
    samples = [audio_sample(i, frames, "en") for i, frames in enumerate([3, 14, 7])]
    free = ASR(max_new_tokens=8, batch_size=3).predict(model, stop_at(-1), samples)
    assert not any(r["stopped"] for r in free)  # all ran to max_new_tokens
    said = plain.encode(free[0]["prediction"])[2]

    class EndsInside(type(stop_at(-1))):  # `said` decodes to text that holds the turn's end
        def decode(self, ids):
            ids = list(ids)
            return plain.decode(ids[: ids.index(said)]) + "。\n\nUser:" if said in ids else plain.decode(ids)

    rows = ASR(max_new_tokens=8, batch_size=3).predict(model, EndsInside(), samples)
    assert rows[0]["stopped"] and rows[0]["prediction"].endswith("。") and "User" not in rows[0]["prediction"]
    assert free[0]["prediction"].startswith(rows[0]["prediction"][:-1])


def test_a_sample_whose_item_compresses_to_nothing_is_skipped_with_its_reason():
    """An image of 2 feature vectors under a compression kernel of 3 leaves no position for its features: its row
    says why it was not predicted; the other rows are those predicted without it."""
    from modrwkv.conversation import Sample, Turn
    from modrwkv.tokenizer import WorldTokenizer
    from tests.modrwkv.test_multimodal import tiny_model

    model, tokenizer = tiny_model(seed=4), WorldTokenizer()
    turns = [Turn("user", "<image>\nWhich digit?"), Turn("assistant", "seven")]
    samples = [Sample(f"i{i}", "image", turns, items=[np.random.default_rng(i).standard_normal((n, 24), np.float32)])
               for i, n in enumerate([9, 2, 7])]
    rows = VQA(max_new_tokens=3, batch_size=2).predict(model, tokenizer, samples)
    assert [r["key"] for r in rows] == ["i0", "i1", "i2"]
    assert rows[1] == {"key": "i1", "language": None, "skipped": "sample i1: its image item 0 has 2 feature "
                                                                 "vectors, none left after the projector's "
                                                                 "compression (kernel 3)",
                       "prediction": "", "stopped": True, "reference": "seven"}  # scored as unanswered: wrong
    assert [rows[0], rows[2]] == VQA(max_new_tokens=3, batch_size=2).predict(model, tokenizer, samples[::2])
    assert VQA().score([rows[1]])[0] == {"accuracy": 0.0}
