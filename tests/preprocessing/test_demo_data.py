"""The demo's spoken digits: what each split says (the audio itself needs espeak-ng; `make demo` builds it)."""

from preprocessing.demo_data import HANZI, WORDS, speech_is_current, speech_texts


def digits_of(text: str, language: str) -> tuple:
    return tuple(WORDS.index(w) for w in text.split()) if language == "en" else tuple(HANZI.index(c) for c in text)


def test_no_test_utterance_is_heard_in_training():
    train, test = speech_texts("train", 384), speech_texts("test", 48)
    assert [language for _, language in test] == ["en", "zh"] * 24
    said = {digits_of(*t) for t in train}
    assert len(said) > 250 and not said & {digits_of(*t) for t in test}  # not even in the other language
    assert speech_texts("test", 48) == test and speech_texts("test", 48, seed=1) != test  # fixed by the seed
    assert speech_texts("train", 500)[:384] == train  # a larger training set extends a smaller one


def test_an_older_build_of_the_speech_data_is_found_out(tmp_path):
    import json

    assert not speech_is_current(tmp_path)
    rows = [{"id": f"test-{i:04d}", "text": text, "language": language}
            for i, (text, language) in enumerate(speech_texts("test", 48))]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert speech_is_current(tmp_path)
    rows[5]["text"] = "one two three"  # a string the older builds could draw
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not speech_is_current(tmp_path)
