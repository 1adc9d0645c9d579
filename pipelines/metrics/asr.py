"""Word and character error rates through `jiwer`, at corpus level: all edits over all reference words (or
characters), as WER tables report them, not a mean of per-utterance rates.

English is normalised first so that spelling choices do not count as errors: case, punctuation,
contractions ("don't" = "do not"), numbers ("twenty one" = "21": spelled-out numbers become digits; ".5" = "0.5";
"5 million" = "five million" = "5000000")
and the symbols % and $ ("5%" = "five percent", "$3" = "three dollars").
Only cardinals are read: a year said in pairs is two numbers ("nineteen ninety" = "19 90", not "1990"), ordinals
and "point five" stay words, and "a thousand" is not 1000. LibriSpeech's references are words, so a model trained
on them is scored word for word; one that writes years or ordinals in digits loses against these words where
Whisper's normaliser (the Open ASR Leaderboard's) would not: compare its WER with such tables only with care.
Mandarin CER compares characters with punctuation and every space removed; numerals are not unified ("三" is not
"3"), as AISHELL's references write them in characters.
"""

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import jiwer

CONTRACTIONS = [  # (pattern, expansion): whole words first, then the general suffixes
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\bcannot\b", "can not"), (r"\bain't\b", "is not"),
    (r"\blet's\b", "let us"), (r"\b(it|that|what|there|here|he|she|who|where)'s\b", r"\1 is"),
    (r"n't\b", " not"), (r"'re\b", " are"), (r"'m\b", " am"), (r"'ve\b", " have"), (r"'ll\b", " will"),
    (r"'d\b", " would"),
]
ONES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                    "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
DIGITS = re.compile(r"\d+(\.\d+)?")
NOT_IN_A_WORD = re.compile(r"[^\w\s.]|_|\.(?!\d)|(?<!\d)\.")  # punctuation; a decimal point (3.5) stays


def read_number(words: list[str], start: int) -> tuple[int, int]:
    """The cardinal spelled out from words[start] on and how many words it takes (0: none starts there).

    Each word must be able to continue the number, so "one two three" is three numbers, "nineteen ninety"
    two, and the "and" of "one apple and two pears" stays a word while that of "three hundred and five" goes."""
    if words[start] == "zero":
        return 0, 1
    total = group = 0
    last = None  # the previous word's kind: "unit", "teen", "tens", "hundred" or "scale"
    largest_allowed = float("inf")  # scales must fall: "two million three thousand"
    i = start
    while i < len(words):
        word = words[i]
        following = words[i + 1] if i + 1 < len(words) else None
        if 0 < ONES.get(word, 0) < 10 and last in (None, "tens", "hundred", "scale"):
            group, last = group + ONES[word], "unit"
        elif ONES.get(word, 0) >= 10 and last in (None, "hundred", "scale"):
            group, last = group + ONES[word], "teen"
        elif word in TENS and last in (None, "hundred", "scale"):
            group, last = group + TENS[word], "tens"
        elif word == "hundred" and last in ("unit", "teen") and group < 100:
            group, last = group * 100, "hundred"
        elif word in SCALES and group and last != "scale" and SCALES[word] < largest_allowed:
            total, group, last, largest_allowed = total + group * SCALES[word], 0, "scale", SCALES[word]
        elif not (word == "and" and last in ("hundred", "scale") and (following in TENS or ONES.get(following, 0))):
            break
        i += 1
    return total + group, i - start


def scaled_digits(number: str, scale: str) -> str | None:
    """A number written in digits times the scale word after it ("5 million", "2.5 billion") as "five million" reads:
    in digits; None when `number` is not digits or `scale` no scale."""
    factor = 100 if scale == "hundred" else SCALES.get(scale)
    if factor is None or not DIGITS.fullmatch(number):
        return None
    value = Decimal(number) * factor
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def number_words_to_digits(words: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(words):
        value, length = read_number(words, i)
        scaled = scaled_digits(words[i], words[i + 1]) if not length and i + 1 < len(words) else None
        out.append(str(value) if length else scaled or words[i])
        i += length or (2 if scaled else 1)
    return out


def normalize_english(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<![\w.])\.(?=\d)", "0.", text)  # .5 -> 0.5 (as punctuation it went: .5 read 5)
    # symbols a transcript spells: 5% -> 5 percent, $5 -> 5 dollars (as punctuation they went: "5" for "5 percent")
    text = re.sub(r"\$(\d+(?:\.\d+)?(?:\s+(?:hundred|thousand|million|billion)\b)?)", r"\1 dollars",
                  text.replace("%", " percent "))  # $5 million -> 5 million dollars
    for pattern, expansion in CONTRACTIONS:
        text = re.sub(pattern, expansion, text)
    text = NOT_IN_A_WORD.sub(" ", text.replace("'", ""))  # a possessive keeps its s: "john's" -> "johns"
    return " ".join(number_words_to_digits(text.split()))


def normalize_mandarin(text: str) -> str:
    """NFKC (full-width letters and digits to ASCII), lowercase, then punctuation and all spaces dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


NORMALIZERS = {"en": normalize_english, "zh": normalize_mandarin}


@dataclass(frozen=True)
class ErrorRate:
    metric: str  # "wer" or "cer": the name the rate is reported under
    rate: float  # (substitutions + deletions + insertions) / reference_length
    substitutions: int
    deletions: int
    insertions: int
    reference_length: int  # words for WER, characters for CER

    def to_dict(self) -> dict:
        return {self.metric: self.rate, "substitutions": self.substitutions, "deletions": self.deletions,
                "insertions": self.insertions, "reference_length": self.reference_length}


def normalized_pairs(references: Sequence[str], hypotheses: Sequence[str], language: str):
    if language not in NORMALIZERS:
        raise ValueError(f"unknown language {language!r}; known: {sorted(NORMALIZERS)}")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    normalize = NORMALIZERS[language]
    references, hypotheses = [normalize(r) for r in references], [normalize(h) for h in hypotheses]
    if not any(references):
        raise ValueError("the references are empty (after normalisation): an error rate needs reference text")
    return references, hypotheses


def error_rate(metric: str, output) -> ErrorRate:
    """jiwer's rate (output.wer or output.cer), under that name, with the counts it came from."""
    length = output.hits + output.substitutions + output.deletions
    return ErrorRate(metric, getattr(output, metric), output.substitutions, output.deletions, output.insertions, length)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRate:
    """English WER after `normalize_english`."""
    references, hypotheses = normalized_pairs(references, hypotheses, "en")
    return error_rate("wer", jiwer.process_words(references, hypotheses))


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str], language: str = "zh") -> ErrorRate:
    """CER: Mandarin ("zh") on characters without spaces; English ("en") on normalised text, spaces included."""
    references, hypotheses = normalized_pairs(references, hypotheses, language)
    return error_rate("cer", jiwer.process_characters(references, hypotheses))
