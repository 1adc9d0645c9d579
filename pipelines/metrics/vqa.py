"""VQA accuracy as the official VQAv2 evaluation computes it, and exact match for single-answer datasets.

Answers are normalised the way the official script does it (vqaEval.py): whitespace, punctuation (with its
digit rules), lowercasing, number words to digits, articles dropped, missing apostrophes restored. The
official script skips normalisation when all ten human answers agree (they are stored normalised); here both
sides are always normalised, as lmms-eval does: safe on other data, and on VQAv2 a reply that needs normalising
against ten agreeing answers ("two" for "2") scores 1 here where the official script gives 0. An empty reply
scores 0, and an answer that is only an article ("A" as a choice letter) keeps its articles (`answer_key`).
"""

import re
from collections import Counter
from collections.abc import Sequence

# A comma between two digits ("1,000") means every punctuation mark is deleted rather than spaced out.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # "dogs." loses its period, "3.5" keeps it
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The official table, less its entries that are no-ops or unreachable (capitalised keys: words are looked up
# lowercased). "somebody'd" -> "somebodyd" is the official table's own mapping, kept so scores match it.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def strip_punctuation(text: str) -> str:
    # As in the official script: a mark next to a space (or any digit-comma-digit in the answer) is deleted,
    # otherwise it becomes a space ("black-and-white" -> "black and white").
    delete_all = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_DECIMAL.sub("", out)


def normalize_answer(text: str, keep_articles: bool = False) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = [NUMBER_WORDS.get(w, w) for w in strip_punctuation(text).lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if keep_articles or w not in ARTICLES)


def answer_key(text: str) -> str:
    """What answers are told apart by: the normalised text, or for one that normalises to nothing (the choice letter
    "A", an article) the text with its articles kept: "A" and "The" both normalised to "" and matched."""
    return normalize_answer(text) or normalize_answer(text, keep_articles=True)


def answers_match(prediction: str, answer: str) -> bool:
    """The prediction's `answer_key` equals the answer's; an empty prediction (a sample left unanswered) matches
    nothing."""
    return bool(prediction.strip()) and answer_key(prediction) == answer_key(answer)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#matching annotators / 3, 1), averaged over the leave-one-out subsets of the (usually 10) answers."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    matches = [answers_match(prediction, a) for a in answers]
    total = sum(matches)
    # leaving out annotator i leaves total - matches[i] matching answers among the others
    return sum(min((total - m) / 3, 1.0) for m in matches) / len(answers)


def best_constant_answer(answer_lists: Sequence[Sequence[str]]) -> str:
    """The one answer that, given to every question, scores the highest VQA accuracy (as its annotators spelled
    it): each answer's score summed over the questions whose annotators gave it, by `vqa_accuracy`'s rule. The most
    frequent reference need not be it: an answer given by 3 of 10 annotators on many questions can outscore one
    that is the reference of more."""
    scores, spelling = Counter(), {}
    for answers in answer_lists:
        keys = [answer_key(a) for a in answers]
        counts = Counter(k for k, a in zip(keys, answers) if a.strip())
        for key, total in counts.items():
            # n - total annotators left out leave `total` matches, `total` of them leave total - 1
            scores[key] += ((len(keys) - total) * min(total / 3, 1.0) + total * min((total - 1) / 3, 1.0)) / len(keys)
        for key, answer in zip(keys, answers):
            spelling.setdefault(key, answer)
    # no answer but blank ones: none scores, and a blank prediction is what scores 0
    return spelling[max(scores, key=lambda k: (scores[k], k))] if scores else ""


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if the prediction matches the answer (`answers_match`; GQA-style single answers), else 0.0."""
    return float(answers_match(prediction, answer))


def mean_vqa_accuracy(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]]) -> float:
    return mean_score(vqa_accuracy, predictions, answer_lists)


def mean_exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    return mean_score(exact_match, predictions, answers)


def mean_score(score, predictions: Sequence, references: Sequence) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(score(p, r) for p, r in zip(predictions, references)) / len(predictions)
