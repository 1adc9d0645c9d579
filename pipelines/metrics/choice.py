"""Multiple choice (ScienceQA / MMBench style: which option letter did the model pick?) and POPE (yes/no)."""

import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass

LETTERS = string.ascii_uppercase
# The reply starts with a letter and a mark, or is one, or is one on its own line, bold or not: "B", "(B)", "B.",
# "b)", "B: a cat", "B\nBecause...", "**B**" (not "A cat").
LEADING_LETTER = re.compile(r"^\**\(?([A-Za-z])(?:[.):*]|[ \t]*(?:\n|$))")
# "The answer is B", "Answer: b)", "answer is (C)", "The answer is: B", "The correct option is B": a lowercase
# letter needs a closing mark, so that "the answer is a cat" is not option A.
STATED_LETTER = re.compile(r"(?i:answer|option|choice)(?:\s+is\s*:?|\s*:)\s*\(?(?:([A-Z])\b|([a-z])(?=[.)]|$))")
# "Option B is right", "I choose C", "I'd pick D", "I think it's C": a capital letter as a word after the verb or
# "option" ("I choose a cat" stays text), not one of a list ("pick A or B", "Select A, B, C or D"), nor after a
# negation ("I would not choose A"); a reply naming two this way names none
NAMED_LETTER = re.compile(r"\b(?i:option|choose|chose|pick|select|it['’]s|it\s+is)\s+([A-Z])\b"
                          r"(?!['’]|\s*(?:[,/]|or\b|and\b))")
NEGATED = re.compile(r"(?i:\bnot|n't|n’t|\bnever)\s+(?:\w+\s+)?$")
BRACKETED_LETTER = re.compile(r"\(([A-Za-z])\)")


def option_letters(n_options: int) -> str:
    if not 0 < n_options <= len(LETTERS):
        raise ValueError(f"expected 1 to {len(LETTERS)} options, got {n_options}")
    return LETTERS[:n_options]


def words_of(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def named_by_text(text: str, letters: str, options: Sequence[str]) -> str | None:
    """The option whose text the response is, or failing that the one whose text it contains; an option found only
    inside a longer one it names ("red" in "dark red") is not named. None for none, or several; a response or
    option without a word (an empty reply, an option ">") names none by text."""
    said = words_of(text)
    if not said:
        return None
    named = [letter for letter, option in zip(letters, options) if words_of(option) == said]
    if not named:
        spans = {letter: [m.span() for m in re.finditer(rf"\b{re.escape(words_of(option))}\b", said)]
                 for letter, option in zip(letters, options) if words_of(option)}
        longer = [(a, b) for found in spans.values() for a, b in found]
        named = [letter for letter, found in spans.items()
                 if any(not any(a <= start and end <= b and b - a > end - start for a, b in longer)
                        for start, end in found)]
    return named[0] if len(named) == 1 else None


def option_starting(text: str, letters: str, options: Sequence[str]) -> str | None:
    """The option whose words `text` starts with (the longest, where one's words begin another's: "dark red" over
    "dark"); None for none."""
    said = words_of(text)
    starts = [(len(words_of(o)), letter) for letter, o in zip(letters, options)
              if words_of(o) and (said == words_of(o) or said.startswith(words_of(o) + " "))]
    return max(starts)[1] if starts else None


def extract_choice(response: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text response names, or None if it names none (or several)."""
    letters = option_letters(len(options))
    text = response.strip()
    # a stated answer first: a reply that echoes the options ("A) dog B) cat ... Answer: C") leads with a letter
    for pattern in (STATED_LETTER, LEADING_LETTER):
        found = pattern.search(text)
        if found and found.group(found.lastindex).upper() in letters:
            letter = found.group(found.lastindex).upper()
            # "The answer is A cat": a stated capital A may be an article, when an option's words follow it at once
            if pattern is STATED_LETTER and letter == "A":
                return option_starting(text[found.end():], letters, options) or letter
            return letter
    named = {m.group(1) for m in NAMED_LETTER.finditer(text) if not NEGATED.search(text[:m.start()])} & set(letters)
    if len(named) == 1:
        return named.pop()
    bracketed = {m.upper() for m in BRACKETED_LETTER.findall(text)} & set(letters)
    if len(bracketed) == 1:
        return bracketed.pop()
    return named_by_text(text, letters, options)  # no letter


def choice_accuracy(responses: Sequence[str], answers: Sequence[str], option_lists: Sequence[Sequence[str]]) -> float:
    """Fraction of responses naming the right letter; a response naming no option counts as wrong."""
    if not len(responses) == len(answers) == len(option_lists):
        raise ValueError(f"{len(responses)} responses, {len(answers)} answers, {len(option_lists)} option lists")
    if not responses:
        raise ValueError("no responses to score")
    right = sum(extract_choice(r, o) == a.upper() for r, a, o in zip(responses, answers, option_lists))
    return right / len(responses)


# ---- POPE ------------------------------------------------------------------------------------------------

NEGATIONS = {"no", "not", "none"}


def parse_yes_no(response: str) -> str | None:
    """"yes", "no" or None, from the first sentence: a negation word makes it "no" (as POPE's script does).
    POPE's script calls everything else "yes"; here a reply with neither is None, so junk is not a "yes"."""
    first_sentence = response.strip().split(".")[0].lower().replace("n't", " not")
    words = set(re.findall(r"[a-z]+", first_sentence))
    if words & NEGATIONS:
        return "no"
    return "yes" if "yes" in words else None


@dataclass(frozen=True)
class PopeScores:
    accuracy: float
    precision: float  # "yes" is the positive class
    recall: float
    f1: float
    yes_ratio: float  # share of all responses parsed as "yes"
    unparsed: int  # responses that were neither yes nor no; wrong for accuracy, never a predicted "yes"

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """As an evaluation logs them: pope_accuracy, pope_precision, ..., pope_unparsed."""
        return {f"pope_{name}": float(value) for name, value in asdict(self).items()}


def pope_scores(responses: Sequence[str], labels: Sequence[str]) -> PopeScores:
    labels = list(labels)
    if len(responses) != len(labels):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    if not responses:
        raise ValueError("no responses to score")
    if set(labels) - {"yes", "no"}:
        raise ValueError(f"POPE labels are 'yes' or 'no', got {sorted(set(labels) - {'yes', 'no'})}")
    predicted = [parse_yes_no(r) for r in responses]
    pairs = list(zip(predicted, labels))
    true_pos = pairs.count(("yes", "yes"))
    false_pos = pairs.count(("yes", "no"))
    true_neg = pairs.count(("no", "no"))
    positives = labels.count("yes")
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PopeScores(accuracy=(true_pos + true_neg) / len(pairs), precision=precision, recall=recall, f1=f1,
                      yes_ratio=predicted.count("yes") / len(pairs), unparsed=predicted.count(None))
