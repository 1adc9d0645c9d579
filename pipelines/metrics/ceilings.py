"""What simple models get from the same cached features a ModRWKV trains on: the ceiling beside every score.

- VQA: an L2-regularised logistic-regression probe per question group on every feature vector of each image, as
  the model reads them (where the answer depends on the asked word, or the images' token counts differ, on the first
  token joined to the mean of the others, with the word one-hot and its product with those: all tokens times every
  word would not fit), its
  strength chosen by 5-fold cross-validation on the training questions; the majority answer of the group's training
  questions as the trivial baseline. Probe and majority learn from every question of a training record (a
  multi-turn record trains the model on each answer) and score each test sample's first question (the one
  evaluation asks);
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


def image_tokens(sample: "Sample") -> np.ndarray:
    """Every feature vector of the image, as the model reads them."""
    return sample.items[0].astype(np.float32).ravel()


def pooled_image(sample: "Sample") -> np.ndarray:
    """The first token joined to the mean of the others: what an asked word's interactions are taken with."""
    tokens = sample.items[0].astype(np.float32)
    return np.concatenate([tokens[0], tokens[1:].mean(0)])


PROBE_STRENGTHS = np.logspace(-3, 1, 5)  # the inverse L2 strengths cross-validation chooses from
PROBE_MAX_ITER = 3000


def probe_space(train_x, test_x) -> tuple[np.ndarray, np.ndarray]:
    """The rows a probe is fit and scored on: standardised features; with more of them than training rows (65
    DINOv2 tokens: 24,960 a digit, 256 digits), their coordinates in the span of the training rows, which is exact
    for an L2-penalised fit (its optimum lies there, and the rotation onto that span keeps the norm) and a hundred
    times faster."""
    from sklearn.preprocessing import StandardScaler  # the [demo] extra, like every ceiling

    scaler = StandardScaler()
    train, test = scaler.fit_transform(np.stack(train_x)), scaler.transform(np.stack(test_x))
    if train.shape[1] > train.shape[0]:
        rows = np.linalg.svd(train, full_matrices=False)[2]  # an orthonormal basis of the training rows' span
        train, test = train @ rows.T, test @ rows.T
    return train, test


def cross_validated_strength(train, train_y, train_images=None) -> float:
    """The inverse L2 strength (of PROBE_STRENGTHS) that scores best over 5 folds of `probe_space`'s training rows.
    `train_images`: each training row's image, so that cross-validation keeps an image's questions in one fold (a
    multi-turn record's other answers in the held-out fold beside it chose the strength on images the probe had
    seen)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score

    # one question an image: the plain stratified folds, as every ceiling before multi-turn records was chosen
    shared = train_images is not None and len(set(train_images)) < len(train_images)
    folds = (StratifiedGroupKFold if shared else StratifiedKFold)(5, shuffle=True, random_state=0)
    fold_accuracy = [cross_val_score(LogisticRegression(C=c, max_iter=PROBE_MAX_ITER), train, train_y, cv=folds,
                                     groups=train_images if shared else None).mean() for c in PROBE_STRENGTHS]
    return float(PROBE_STRENGTHS[int(np.argmax(fold_accuracy))])


def probe_accuracy(train_x, train_y, test_x, test_y, train_images=None) -> float:
    """A logistic regression on `probe_space`'s rows at the `cross_validated_strength`."""
    from sklearn.linear_model import LogisticRegression

    if len(set(train_y)) < 2:
        return float(np.mean(np.array(test_y) == train_y[0]))
    train, test = probe_space(train_x, test_x)
    strength = cross_validated_strength(train, train_y, train_images)
    probe = LogisticRegression(C=strength, max_iter=PROBE_MAX_ITER).fit(train, train_y)
    return float(np.mean(probe.predict(test) == np.array(test_y)))


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
    return {group: {"ceiling": probe_accuracy(xtr, ytr, xte, yte, images), "baseline": majority_accuracy(ytr, yte)}
            for group, (xtr, ytr, images, xte, yte) in question_groups(train, test, group_of, asked).items()}


def question_groups(train: list["Sample"], test: list["Sample"], group_of: Callable[["Sample"], str] = lambda s: "all",
                    asked: dict[str, list[str]] | None = None) -> dict[str, tuple]:
    """{group: (training features, answers, images, test features, answers)}: the rows each group's probe is fit
    and scored on (`questions`), for each question group of `test`."""
    out = {}
    # the training rows in key order: the folds that choose the probe's strength follow the rows' order, which the
    # cache's shards would otherwise set (their sha256 order moved the digits' probe from 0.83 to 0.84)
    train = sorted(train, key=lambda s: s.key)
    # every token where every image has as many (DINOv2, CLIP); a NaFlex encoder's counts vary with the image
    whole = len({s.items[0].shape for s in (*train, *test)}) == 1
    for group in sorted({group_of(s) for s in test}):
        words = (asked or {}).get(group)
        xtr, ytr, images = questions([s for s in train if group_of(s) == group], words, every_turn=True, whole=whole)
        xte, yte, _ = questions([s for s in test if group_of(s) == group], words, every_turn=False, whole=whole)
        out[group] = (xtr, ytr, images, xte, yte)
    return out


def questions(samples: list["Sample"], words: list[str] | None, every_turn: bool,
              whole: bool = True) -> tuple[list, list[str], list[str]]:
    """(probe features, normalised answers, images) of the samples' (question, answer) turns: every turn (training:
    the model learns each answer of a multi-turn record), or each sample's first (test: the question evaluation
    asks). `whole`: every token of the image (else, and with asked words, the pooled image). An image is named by its
    feature files, which two records of one image share (a sample read without them: by its key)."""
    x, y, images = [], [], []
    for sample in samples:
        image = image_tokens(sample) if whole and not words else pooled_image(sample)
        turns = zip([t.text for t in sample.turns if t.role == "user"],
                    [t.text for t in sample.turns if t.role == "assistant"])
        for question, answer in turns if every_turn else [next(turns)]:
            x.append(with_asked(image, asked_words(question, words)) if words else image)
            y.append(normalize_answer(answer))
            images.append("|".join(sample.item_files) or sample.key)
    return x, y, images


def ridge_forecast_mse(train: list["Sample"], test: list["Sample"]) -> float:
    from sklearn.linear_model import RidgeCV  # the [demo] extra, like every ceiling

    stack = lambda ss, k: np.stack([getattr(s, k) for s in ss])  # noqa: E731
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(stack(train, "lookback"), stack(train, "target"))
    std = np.array([s.meta["std"] for s in test])
    return ForecastErrors().add(ridge.predict(stack(test, "lookback")), stack(test, "target"), std).result()["mse"]
