"""The shapes VQA set: LLaVA records the reader accepts, every question type in equal numbers, answers that
match the pixels drawn, one extra record per training image asking three different yes/no questions per shape drawn
(or one) in turn about that image, and the same set for the same seed."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipelines.cli import main
from preprocessing.readers.llava import read_llava
from preprocessing.shapes_data import ASKABLE, COLOURS, COUNTS, QUESTION_TYPES, build_shapes


def drawn_shapes(image_path) -> int:
    """The shapes in an image: its connected non-white regions (the generator keeps them apart)."""
    return ndimage.label(np.asarray(Image.open(image_path).convert("L")) < 250)[1]


def test_records_read_as_llava_with_balanced_types_and_true_answers(tmp_path):
    build_shapes(tmp_path, n_train=60, n_test=10, seed=3, n_val=4)
    samples, rejects = read_llava(str(tmp_path / "train.json"))
    assert len(samples) == 120 and rejects == []
    records = json.loads((tmp_path / "train.json").read_text())
    assert Counter(r["type"] for r in records) == {**{t: 12 for t in QUESTION_TYPES}, "yesno": 72}
    assert Counter(Counter(r["image"] for r in records).values()) == {2: 60}  # each image asked twice
    extra = [r for r in records if "-yesno" in r["id"]]
    assert {r["conversations"][1]["value"] for r in extra} == {"yes", "no"}
    for r in extra:  # three different questions per shape drawn, asked in turn
        questions = [t["value"].removeprefix("<image>\n") for t in r["conversations"][::2]]
        assert len(set(questions)) == len(questions) == min(3 * drawn_shapes(tmp_path / r["image"]), ASKABLE), r["id"]
    turns = [(r, turn["value"], answer["value"]) for r in records
             for turn, answer in zip(r["conversations"][::2], r["conversations"][1::2])]
    for r, question, answer in turns:
        assert question.startswith("<image>\n") == (question == r["conversations"][0]["value"])
        assert len(answer.split()) == 1
        pixels = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB")).reshape(-1, 3)
        inked = {tuple(p) for p in pixels if tuple(p) != (255, 255, 255)}
        drawn = {name for name, rgb in COLOURS.items() if rgb in inked}
        if r["type"] == "colour":
            assert drawn == {answer}, r["id"]
        elif r["type"] == "count":
            assert 1 <= len(drawn) <= COUNTS.index(answer) + 1, r["id"]  # shapes may share a colour
        elif r["type"] == "position":
            ys, xs = np.nonzero(np.asarray(Image.open(tmp_path / r["image"]).convert("L")) < 250)
            cx, cy = xs.mean(), ys.mean()
            side = {"left": cx < 20, "right": cx > 43, "top": cy < 20, "bottom": cy > 43}
            assert side[answer], (r["id"], cx, cy)
        elif r["type"] == "yesno" and "shape?" in question:  # "Is there a <colour> shape?"
            asked = question.split()[-2]
            assert (asked in drawn) == (answer == "yes"), r["id"]
    test = json.loads((tmp_path / "test.json").read_text())
    assert Counter(r["type"] for r in test) == {t: 2 for t in QUESTION_TYPES}
    assert {len(r["conversations"]) for r in [*test, *records] if "-yesno" not in r["id"]} == {2}
    build_shapes(tmp_path, n_train=60, n_test=10, seed=3, yesno_per_shape=1, n_val=4)
    extra = [r for r in json.loads((tmp_path / "train.json").read_text()) if "-yesno" in r["id"]]
    assert all(len(r["conversations"]) == 2 * drawn_shapes(tmp_path / r["image"]) for r in extra)
    build_shapes(tmp_path, n_train=60, n_test=10, seed=3, yesno_turns=3, n_val=4)  # as many whatever the shapes drawn
    extra = [r for r in json.loads((tmp_path / "train.json").read_text()) if "-yesno" in r["id"]]
    assert {len(r["conversations"]) for r in extra} == {6}


def test_same_seed_same_set_and_the_cli(tmp_path):
    assert main(["data", "shapes", "--out", str(tmp_path / "a"), "--train", "10", "--val", "4", "--test", "5",
                 "--seed", "1",
                 "--yesno-per-shape", "2"]) == 0
    build_shapes(tmp_path / "b", 10, 5, seed=1, yesno_per_shape=2, n_val=4)
    build_shapes(tmp_path / "c", 10, 5, seed=1, n_val=4)
    assert (tmp_path / "a" / "train.json").read_text() != (tmp_path / "c" / "train.json").read_text()
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.json").read_text() == (tmp_path / "b" / f"{split}.json").read_text()
    first = json.loads((tmp_path / "a" / "test.json").read_text())[0]
    assert (tmp_path / "a" / first["image"]).read_bytes() == (tmp_path / "b" / first["image"]).read_bytes()


def test_extra_questions_leave_images_and_test_split_unchanged(tmp_path):
    build_shapes(tmp_path / "plain", 20, 10, seed=2, extra_yesno=0, n_val=4)
    build_shapes(tmp_path / "extra", 20, 10, seed=2, n_val=4)
    plain, extra = (json.loads((tmp_path / d / "train.json").read_text()) for d in ("plain", "extra"))
    assert len(plain) == 20 and [r for r in extra if "-yesno" not in r["id"]] == plain
    assert (tmp_path / "plain" / "test.json").read_text() == (tmp_path / "extra" / "test.json").read_text()
    for name in ("train-00007.png", "test-00003.png"):
        plain, extra = (tmp_path / folder / "images" / name for folder in ("plain", "extra"))
        assert plain.read_bytes() == extra.read_bytes()


def test_no_split_depends_on_the_training_size_nor_its_own(tmp_path):
    build_shapes(tmp_path / "small", 10, 5, seed=4, n_val=4)
    build_shapes(tmp_path / "large", 30, 5, seed=4, n_val=8)
    assert (tmp_path / "small" / "test.json").read_text() == (tmp_path / "large" / "test.json").read_text()
    small_val, large_val = (json.loads((tmp_path / d / "val.json").read_text()) for d in ("small", "large"))
    assert large_val[:4] == small_val and [r["id"] for r in small_val] == [f"shapes-val-{i:05d}" for i in range(4)]
    test = json.loads((tmp_path / "small" / "test.json").read_text())
    assert [r["conversations"] for r in test[:4]] != [r["conversations"] for r in small_val]  # its own draws
    small, large = (json.loads((tmp_path / d / "train.json").read_text()) for d in ("small", "large"))
    assert [r for r in large if int(r["id"].split("-")[2]) < 10] == small  # the first training images are kept too
    for name in ("train-00009.png", "test-00004.png"):
        small, large = (tmp_path / folder / "images" / name for folder in ("small", "large"))
        assert small.read_bytes() == large.read_bytes()


def test_no_image_is_in_two_splits_whatever_it_is_asked(tmp_path):
    """The images' space is small for a position question (1,248: shapes x colours x 4 edges x 13 places): drawn
    freely, 365 of test's 500 position questions repeated a training image and question, and val repeated some 190
    of test's 2,500 records; a test image was also among the training images asked extra yes/no questions. Each
    split now draws from its own images."""
    build_shapes(tmp_path, n_train=1500, n_test=400, seed=0, n_val=400)
    images = {}
    for split in ("train", "test", "val"):
        for r in json.loads((tmp_path / f"{split}.json").read_text()):
            images.setdefault(split, set()).add((tmp_path / r["image"]).read_bytes())
    assert len(images["train"]) > 1200 and len(images["test"]) > 300 and len(images["val"]) > 300
    assert not images["train"] & images["test"] and not images["train"] & images["val"]
    assert not images["val"] & images["test"]


def test_more_yesno_questions_than_an_image_has_is_refused(tmp_path):
    with pytest.raises(ValueError, match="yesno_per_shape must be 1-11"):
        build_shapes(tmp_path, 2, 1, yesno_per_shape=12, n_val=4)
    with pytest.raises(ValueError, match="yesno_turns must be 1-11"):
        build_shapes(tmp_path, 2, 1, yesno_turns=0, n_val=4)
    assert not (tmp_path / "train.json").exists()
