"""The demo's data splits: what each split of the spoken digits says (the audio itself needs espeak-ng; `make demo`
builds it), and which digit images each split holds."""

import json

import pytest

from preprocessing.demo_data import HANZI, WORDS, build_digits, speech_is_current, speech_texts


def digits_of(text: str, language: str) -> tuple:
    return tuple(WORDS.index(w) for w in text.split()) if language == "en" else tuple(HANZI.index(c) for c in text)


def test_no_val_or_test_utterance_is_heard_in_training_nor_val_in_test():
    train, val, test = speech_texts("train", 384), speech_texts("val", 48), speech_texts("test", 48)
    assert [language for _, language in test] == [language for _, language in val] == ["en", "zh"] * 24
    said = {split: {digits_of(*t) for t in texts} for split, texts in (("train", train), ("val", val), ("test", test))}
    assert len(said["train"]) > 250 and len(said["val"]) > 35  # not even in the other language:
    assert not said["train"] & said["test"] and not said["train"] & said["val"] and not said["val"] & said["test"]
    assert speech_texts("test", 48) == test and speech_texts("test", 48, seed=1) != test  # fixed by the seed
    assert speech_texts("train", 500)[:384] == train  # a larger training set extends a smaller one


def test_the_test_utterances_are_those_said_before_val_was_split_off():
    """The test split of 2026-12-05 (its first utterances as then drawn): the quality tables' figures stay
    comparable across the change."""
    assert speech_texts("test", 4) == [("six zero zero", "en"), ("五三零", "zh"), ("one nine nine", "en"),
                                       ("五七七", "zh")]


def write_split(folder, split: str, texts) -> None:
    rows = [{"id": f"{split}-{i:04d}", "audio": f"audio/{split}-{i:04d}.wav", "text": text, "language": language}
            for i, (text, language) in enumerate(texts)]
    (folder / "audio").mkdir(exist_ok=True)
    for row in rows:
        (folder / row["audio"]).write_bytes(b"RIFF")
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_an_older_build_of_the_speech_data_is_found_out(tmp_path):
    sizes = {"n_train": 8, "n_val": 4, "n_test": 6}
    assert not speech_is_current(tmp_path, sizes)
    for split, n in (("train", 8), ("val", 4), ("test", 6)):
        write_split(tmp_path, split, speech_texts(split, n))
    assert speech_is_current(tmp_path, sizes)
    assert not speech_is_current(tmp_path, {**sizes, "n_train": 16})  # a smaller build than the sizes of today
    test = speech_texts("test", 6)
    write_split(tmp_path, "test", [("one two three", "en"), *test[1:]])  # a string the older builds could draw
    assert not speech_is_current(tmp_path, sizes)
    write_split(tmp_path, "test", test)
    (tmp_path / "audio" / "test-0005.wav").unlink()  # a build cut short before its last clip
    assert not speech_is_current(tmp_path, sizes)
    write_split(tmp_path, "test", test)
    (tmp_path / "val.jsonl").unlink()  # a build from before the val split
    assert not speech_is_current(tmp_path, sizes)


def test_digit_splits_share_no_image_and_val_leaves_training_as_it_was(tmp_path):
    pytest.importorskip("sklearn")  # the [demo] extra, installed by make test
    build_digits(tmp_path / "a", 20, 5, n_val=10)
    build_digits(tmp_path / "b", 20, 5, n_val=30)
    ids = {split: [r["id"] for r in json.loads((tmp_path / "a" / f"{split}.json").read_text())]
           for split in ("train", "val", "test")}
    assert ids["train"] == [f"digit-{i:04d}" for i in range(20)] and ids["val"][0] == "digit-0020"
    assert ids["test"] == [f"digit-{i:04d}" for i in range(1792, 1797)] and len(ids["val"]) == 10
    assert (tmp_path / "a" / "train.json").read_text() == (tmp_path / "b" / "train.json").read_text()
    assert (tmp_path / "a" / "test.json").read_text() == (tmp_path / "b" / "test.json").read_text()
    with pytest.raises(ValueError, match="sklearn has 1797"):
        build_digits(tmp_path / "c", 1000, 100, n_val=700)
