"""What simple models get from the same cached features a ModRWKV trains on: the ceiling beside every score.

- VQA: a logistic-regression probe per question group, on each image's features read as its first token joined
  to the mean of the others (with the asked word, one-hot, and its product with the features where the answer
  depends on it), and the majority answer of the group's training questions as the trivial baseline. Probe and
  majority learn from every question of a training record (a multi-turn record trains the model on each answer)
  and score each test sample's first question (the one evaluation asks);
- forecasting: ridge regression from the normalised lookback to the normalised horizon (alpha chosen by
  leave-one-out on the training windows), scored on the original scale.
Both are deterministic: one value per cache pair.
"""

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from preprocessing.cache.entry import FeatureCache

from .forecast import ForecastErrors
from .vqa import normalize_answer

if TYPE_CHECKING:  # the driver (`modrwkv demo`) loads no torch
    from modrwkv.conversation import Sample


def cache_samples(uri: str) -> list["Sample"]:
    return list(FeatureCache(uri).iter_samples(shuffle=False))  # every sample, in shard order


def image_vector(sample: "Sample") -> np.ndarray:
    tokens = sample.items[0]
    return np.concatenate([tokens[0], tokens[1:].mean(0)])


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression  # the [demo] extra, like every ceiling
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_y)) < 2:
        return float(np.mean(np.array(test_y) == train_y[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    probe.fit(np.stack(train_x), train_y)
    return float(np.mean(probe.predict(np.stack(test_x)) == np.array(test_y)))


def majority_accuracy(train_y, test_y) -> float:
    majority = Counter(train_y).most_common(1)[0][0]
    return float(np.mean(np.array(test_y) == majority))


def asked_words(question: str, vocabulary: list[str]) -> np.ndarray:
    """One-hot of the vocabulary words the question names."""
    question = f" {question.lower().rstrip('?')} "
    return np.array([f" {w} " in question for w in vocabulary], dtype=np.float32)


def with_asked(image: np.ndarray, asked: np.ndarray) -> np.ndarray:
    """Image features, the asked word, and their outer product: "is the asked colour the one the features
    hold" is an interaction, which a linear probe reads only from the product."""
    return np.concatenate([image, asked, np.outer(asked, image).ravel()])


def vqa_ceilings(train: list["Sample"], test: list["Sample"], group_of: Callable[["Sample"], str] = lambda s: "all",
                 asked: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """{group: {"ceiling": probe accuracy, "baseline": majority accuracy}} for each question group of `test`.
    `asked` maps a group to the words its questions may name (e.g. yes/no questions), given to its probe."""
    out = {}
    for group in sorted({group_of(s) for s in test}):
        words = (asked or {}).get(group)
        xtr, ytr = questions([s for s in train if group_of(s) == group], words, every_turn=True)
        xte, yte = questions([s for s in test if group_of(s) == group], words, every_turn=False)
        out[group] = {"ceiling": probe_accuracy(xtr, ytr, xte, yte), "baseline": majority_accuracy(ytr, yte)}
    return out


def questions(samples: list["Sample"], words: list[str] | None, every_turn: bool) -> tuple[list, list[str]]:
    """(probe features, normalised answers) of the samples' (question, answer) turns: every turn (training: the
    model learns each answer of a multi-turn record), or each sample's first (test: the question evaluation asks)."""
    x, y = [], []
    for sample in samples:
        image = image_vector(sample)
        turns = zip([t.text for t in sample.turns if t.role == "user"],
                    [t.text for t in sample.turns if t.role == "assistant"])
        for question, answer in turns if every_turn else [next(turns)]:
            x.append(with_asked(image, asked_words(question, words)) if words else image)
            y.append(normalize_answer(answer))
    return x, y


def ridge_forecast_mse(train: list["Sample"], test: list["Sample"]) -> float:
    from sklearn.linear_model import RidgeCV  # the [demo] extra, like every ceiling

    stack = lambda ss, k: np.stack([getattr(s, k) for s in ss])  # noqa: E731
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(stack(train, "lookback"), stack(train, "target"))
    std = np.array([s.meta["std"] for s in test])
    return ForecastErrors().add(ridge.predict(stack(test, "lookback")), stack(test, "target"), std).result()["mse"]
