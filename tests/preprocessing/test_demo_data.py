"""The demo's spoken digits: what each split says (the audio itself needs espeak-ng; `make demo` builds it)."""

from preprocessing.demo_data import HANZI, WORDS, speech_texts


def digits_of(text: str, language: str) -> tuple:
    return tuple(WORDS.index(w) for w in text.split()) if language == "en" else tuple(HANZI.index(c) for c in text)


def test_no_test_utterance_is_heard_in_training():
    train, test = speech_texts("train", 384), speech_texts("test", 48)
    assert [language for _, language in test] == ["en", "zh"] * 24
    said = {digits_of(*t) for t in train}
    assert len(said) > 250 and not said & {digits_of(*t) for t in test}  # not even in the other language
    assert speech_texts("test", 48) == test and speech_texts("test", 48, seed=1) != test  # fixed by the seed
    assert speech_texts("train", 500)[:384] == train  # a larger training set extends a smaller one
