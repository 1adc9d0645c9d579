"""Ceilings and trivial baselines on synthetic cached samples whose answers the features do or do not hold."""

from itertools import count

import numpy as np

from modrwkv.conversation import Sample, Turn
from pipelines.metrics.ceilings import ridge_forecast_mse, vqa_ceilings

KEYS = count()  # every sample its own key, as a cache's are


def vqa_sample(tokens, question, answer, group):
    return Sample(f"q{next(KEYS)}", "image", [Turn("user", f"<image>\n{question}"), Turn("assistant", answer)],
                  items=[tokens.astype(np.float32)], meta={"group": group})


def test_probe_reads_what_the_features_hold_and_the_majority_baseline(monkeypatch):
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue"]

    def make(n):
        samples = []
        for i in range(n):
            c = i % 3 if i % 5 else 0  # "red" is the most common answer
            tokens = rng.standard_normal((5, 8))
            tokens[1:, c] += 3.0  # the colour is in the patch tokens' mean
            samples.append(vqa_sample(tokens, "What colour?", colours[c], "colour"))
            asked = colours[rng.integers(3)]  # yes/no: the answer needs the asked word too
            answer = "yes" if asked == colours[c] else "no"
            samples.append(vqa_sample(tokens, f"Is there a {asked} shape?", answer, "yesno"))
            noise = rng.standard_normal((5, 8))  # the answer is not in the features at all
            samples.append(vqa_sample(noise, "Odd?", ["yes", "no"][rng.integers(2)], "noise"))
        return samples

    train, test = make(300), make(150)
    result = vqa_ceilings(train, test, lambda s: s.meta["group"], {"yesno": colours})
    # the folds, and so the strength chosen, whatever order the cache's shards hold the training samples in
    import sklearn.model_selection

    folded, cross_val_score = [], sklearn.model_selection.cross_val_score
    monkeypatch.setattr(sklearn.model_selection, "cross_val_score", lambda estimator, x, y, **kwargs: folded.append(
        np.asarray(x)[:, 0].round(6).tolist()) or cross_val_score(estimator, x, y, **kwargs))
    orders = []
    for ordered in (train, train[::-1]):
        folded.clear()
        assert vqa_ceilings(ordered, test, lambda s: s.meta["group"], {"yesno": colours}) == result
        orders.append(list(folded))
    assert orders[0] == orders[1]
    assert result["colour"]["ceiling"] > 0.97
    assert abs(result["colour"]["baseline"] - np.mean([turn == "red" for turn in
               (s.text("assistant") for s in test if s.meta["group"] == "colour")])) < 1e-9
    assert result["yesno"]["ceiling"] > 0.9
    assert result["noise"]["ceiling"] < 0.7
    without_word = vqa_ceilings(train, test, lambda s: s.meta["group"])
    assert without_word["yesno"]["ceiling"] < 0.8  # the asked word matters


def test_ridge_recovers_a_linear_forecast_on_the_original_scale():
    rng = np.random.default_rng(1)
    true_map = rng.standard_normal((12, 3)) / 4

    def make(n, noise):
        samples = []
        for _ in range(n):
            lookback = rng.standard_normal(12)
            target = lookback @ true_map + noise * rng.standard_normal(3)
            samples.append(Sample("w", "series", [], lookback=lookback, target=target,
                                  meta={"mean": rng.uniform(300, 400), "std": 2.0}))
        return samples

    exact = ridge_forecast_mse(make(200, 0.0), make(50, 0.0))
    noisy = ridge_forecast_mse(make(200, 0.5), make(50, 0.5))
    assert exact < 1e-3
    assert 0.5 < noisy < 1.5  # noise variance 0.25, times std² = 4, on the original scale


def test_probe_and_majority_learn_every_turn_of_a_training_record_and_score_the_first_test_question(monkeypatch):
    # shapes' extra records ask several yes/no questions of one image in turn, and the model learns every answer
    rng = np.random.default_rng(2)
    colours = ["red", "green", "blue"]

    def image(colour):
        tokens = rng.standard_normal((5, 8))
        tokens[1:, colours.index(colour)] += 3.0
        return tokens

    def record(turns, tokens, files=()):
        conversation = [Turn(role, text) for question, answer in turns
                        for role, text in (("user", question), ("assistant", answer))]
        return Sample(f"q{next(KEYS)}", "image", conversation, list(files), items=[tokens.astype(np.float32)])

    train = []
    for i in range(300):  # the first question is always answered "no": only the later turns hold a "yes"
        drawn = colours[i % 3]
        absent = colours[(i + 1) % 3]
        tokens, files = image(drawn), [f"image-{i}.npy"]
        train.append(record([(f"<image>\nIs there a {absent} shape?", "no"), (f"Is there a {drawn} shape?", "yes"),
                             (f"Is there a {drawn} shape?", "yes")], tokens, files))
        if i % 2:  # a second record of the same image (shapes' extra yes/no records): its own key, the same image
            train.append(record([(f"<image>\nIs there a {drawn} shape?", "yes")], tokens, files))
    test = []
    for i in range(100):  # "yes" 70 times; a second turn that evaluation never asks
        drawn = colours[i % 3]
        asked = drawn if i % 10 < 7 else colours[(i + 1) % 3]
        test.append(record([(f"<image>\nIs there a {asked} shape?", "yes" if asked == drawn else "no"),
                            ("Odd?", "maybe")], image(drawn)))

    import sklearn.model_selection

    folds, cross_val_score = [], sklearn.model_selection.cross_val_score

    def recorded(estimator, x, y, cv, groups=None):
        images = np.asarray(groups)
        folds.extend((set(images[fit]), set(images[held])) for fit, held in cv.split(x, y, groups))
        return cross_val_score(estimator, x, y, cv=cv, groups=groups)

    monkeypatch.setattr(sklearn.model_selection, "cross_val_score", recorded)
    result = vqa_ceilings(train, test, asked={"all": colours})["all"]
    assert result["ceiling"] > 0.9  # a probe on first turns alone knows only "no": 0.30
    assert abs(result["baseline"] - 0.7) < 1e-9  # the majority of all 1,050 training answers, "yes"
    # the strength was chosen on folds that keep each image's questions together, over its records
    assert len(folds) == 5 * 5 and all(len(held) > 40 and not fit & held for fit, held in folds)
    assert len(set().union(*folds[0])) == 300


def test_the_probe_reads_every_token_as_the_model_does():
    """The probe read the first token joined to the others' mean, and the digits' pooled probe (0.72) stood under a
    probe on all 65 tokens (0.83), where the model read all of them: its "ceiling" was not one. Here the class sits
    in which patch token holds a bump, which the mean of the patch tokens loses; more features than training rows
    (solved in their span) and the strength chosen by cross-validation."""
    rng = np.random.default_rng(3)

    def make(n):
        samples = []
        for i in range(n):
            tokens = rng.standard_normal((9, 40))
            tokens[1 + i % 4, :4] += 2.5  # the class: which of patch tokens 1-4 carries the bump
            samples.append(vqa_sample(tokens, "Which?", f"c{i % 4}", "all"))
        return samples

    train, test = make(200), make(100)
    assert vqa_ceilings(train, test)["all"]["ceiling"] > 0.9  # 360 features, 200 rows
    pooled = [vqa_sample(np.stack([s.items[0][0], s.items[0][1:].mean(0)]), "Which?", s.text("assistant"), "all")
              for s in (*train, *test)]
    assert vqa_ceilings(pooled[:200], pooled[200:])["all"]["ceiling"] < 0.6  # what the pooled probe saw
    # token counts that vary with the image (a NaFlex encoder's): the pooled image, where stacking them failed
    ragged = [vqa_sample(s.items[0][: 9 - i % 2], "Which?", s.text("assistant"), "all")
              for i, s in enumerate((*train, *test))]
    assert vqa_ceilings(ragged[:200], ragged[200:])["all"]["ceiling"] < 0.6
