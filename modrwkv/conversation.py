"""The chat template and the token/label layout of a multimodal training sample.

    User: <image>\nWhat digit is this?\n\nAssistant: seven\n\n

A turn's text is normalised first (`turn_text`): "\n\n" ends a turn, so none stays inside one.

Every modality placeholder in a user turn expands to as many positions as its (compressed) feature sequence
has vectors; the model writes the adapted features there. Labels: the assistant's words and its closing
"\n\n" are learned; user turns, the "Assistant:" prefix and modality positions get -100 (ignored).

A cached sample (`Sample`) is what the encode job writes into a cache entry and what training and evaluation read
back; its layout in a shard is defined here alone (`to_shard_record`, `from_shard_record`); the tar container, the
byte coding and the checks are the cache's (`preprocessing/cache/entry.py`):

    <key>.json          turns, "modality", "features" (its item files in the feature store, in placeholder order;
                        none for a raw series window, whose item is its lookback: `Sample.items_inline`)
                        and the provenance beside them (id, source, language, series mean/std, content_sha256)
    <key>.lookback.npy  series: the normalised lookback
    <key>.target.npy    series: the normalised horizon

This module and `tokenizer.py` import no torch: the encode job's data workers, the cache and evaluation's
scoring read the format without it (`modrwkv/batching.py` turns samples into tensors).
"""

import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field

import numpy as np

from .tokenizer import SPECIAL_TOKENS, WorldTokenizer

IGNORE = -100
PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "series": "<series>"}  # modality -> its placeholder text
PLACEHOLDER_IDS = {modality: SPECIAL_TOKENS[text] for modality, text in PLACEHOLDERS.items()}
# what a user turn's text may hold as tokens: its placeholders; "<|endoftext|>" written in it is text, as chat reads a
# question (a scraped conversation's literal one became a document break inside the prompt in training alone)
TURN_SPECIALS = frozenset(PLACEHOLDERS.values())
MODALITY_OF_ID = {v: k for k, v in PLACEHOLDER_IDS.items()}
ROLES = {"user": "User", "assistant": "Assistant"}
TURN_END = "\n\n"


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"turn role must be one of {sorted(ROLES)}, got {self.role!r}")


def turn_text(text: str) -> str:
    """A turn's text as the template lays it out, in training and at inference alike: line ends as "\n", no
    surrounding whitespace, no blank line (a run of newlines is one), as RWKV's own chat format writes turns. A
    "\n\n" kept inside an answer was learned as text, where every decoder stops the answer at it (a LLaVA
    description's second paragraph trained, then cut), and inside a question it read as the turn's end."""
    return re.sub(r"\n{2,}", "\n", re.sub(r"\r\n?", "\n", text)).strip()


def expand_placeholders(ids: list[int], item_lengths: list[int], sample_id: str, labels: list[int] | None = None):
    """Each placeholder id becomes item_lengths[i] copies of itself (label IGNORE), items in order of appearance.

    Returns (ids, labels); labels default to all IGNORE."""
    count = sum(t in MODALITY_OF_ID for t in ids)
    if count != len(item_lengths):
        raise ValueError(
            f"sample {sample_id}: the text has {count} modality placeholders but {len(item_lengths)} feature items were given"
        )
    labels = labels if labels is not None else [IGNORE] * len(ids)
    out_ids, out_labels, items = [], [], iter(item_lengths)
    for t, label in zip(ids, labels):
        n = next(items) if t in MODALITY_OF_ID else 1
        out_ids += [t] * n
        out_labels += [IGNORE] * n if t in MODALITY_OF_ID else [label]
    return out_ids, out_labels


def tokenize_conversation(
    tokenizer: WorldTokenizer, turns: list[Turn], item_lengths: list[int], sample_id: str = "?",
    specials: bool | Collection[str] = TURN_SPECIALS,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels), aligned: labels[t] is the target for input position t (shift when computing the loss).
    `specials`: the special tokens a user turn's text may hold (`WorldTokenizer.encode`'s allow_special)."""
    if not turns:
        raise ValueError(f"sample {sample_id}: no turns")
    ids, labels = [], []
    for turn in turns:
        if turn.role == "user":
            piece = tokenizer.encode(f"{ROLES['user']}: {turn_text(turn.text)}{TURN_END}", allow_special=specials)
            ids += piece
            labels += [IGNORE] * len(piece)
        else:
            if any(s in turn.text for s in PLACEHOLDERS.values()):
                raise ValueError(f"sample {sample_id}: modality placeholders belong in user turns")
            prefix = tokenizer.encode(f"{ROLES['assistant']}:")
            answer = tokenizer.encode(f" {turn_text(turn.text)}{TURN_END}")
            ids += prefix + answer
            labels += [IGNORE] * len(prefix) + answer
    if turns[-1].role == "user":  # a prompt: its answer (words, or a forecast read here) follows "Assistant:"
        prefix = tokenizer.encode(f"{ROLES['assistant']}:")
        ids += prefix
        labels += [IGNORE] * len(prefix)
    return expand_placeholders(ids, item_lengths, sample_id, labels)


def text_length(tokenizer: WorldTokenizer, turns: list[Turn], n_items: int, sample_id: str = "?") -> int:
    """The conversation's tokens without its feature items: its length in a batch is this plus the items'."""
    return len(tokenize_conversation(tokenizer, turns, [0] * n_items, sample_id)[0])


def prompt_ids(tokenizer: WorldTokenizer, user_text: str, item_lengths: list[int], sample_id: str = "?",
               specials: bool | Collection[str] = TURN_SPECIALS) -> list[int]:
    """A generation prompt: one user turn, then "Assistant:" for the model to continue. The same tokens as a
    training conversation that ends with that user turn (a forecasting sample), so a forecast head reads the
    position it was trained on."""
    return tokenize_conversation(tokenizer, [Turn("user", user_text)], item_lengths, sample_id, specials)[0]


SERIES_ARRAYS = ("lookback", "target")


@dataclass
class Sample:
    key: str
    modality: str  # image | audio | series: its items', and the projector that reads them
    turns: list[Turn]
    item_files: list[str] = field(default_factory=list)  # its items in the feature store, in placeholder order
    items: list[np.ndarray] = field(default_factory=list)  # their features, once read from the store
    lookback: np.ndarray | None = None  # series windows: the normalised lookback, for the forecast skip and baselines
    target: np.ndarray | None = None  # series windows: the normalised horizon
    meta: dict = field(default_factory=dict)  # json-able provenance and extras: id, source, language, mean, std

    @property
    def items_inline(self) -> bool:
        """A raw series window (the WaveNet's input) is its own item, its normalised lookback, stored with it rather
        than in the feature store (GIFT-Eval's 280M windows would be as many store files, each a copy)."""
        return self.modality == "series" and not self.item_files and self.lookback is not None

    def to_shard_record(self) -> dict:
        """{"__key__", "json": the .json member's document, "<name>.npy": array}: a WebDataset sample, which is what
        a shard stores. The features stay in the store: only their names are written (a raw series window's item is
        its lookback array, written here)."""
        document = {**self.meta, "turns": [asdict(t) for t in self.turns], "modality": self.modality,
                    "features": self.item_files}
        arrays = {f"{name}.npy": getattr(self, name) for name in SERIES_ARRAYS if getattr(self, name) is not None}
        return {"__key__": self.key, "json": document, **arrays}

    @classmethod
    def from_shard_record(cls, record: dict) -> "Sample":
        """The sample of a record `to_shard_record` wrote (its items not read yet)."""
        meta = dict(record["json"])
        turns, modality, files = (meta.pop(k) for k in ("turns", "modality", "features"))
        unknown = set(record) - {"__key__", "json"} - {f"{name}.npy" for name in SERIES_ARRAYS}
        if unknown:
            raise ValueError(f"sample {record['__key__']!r}: unknown members {sorted(unknown)}")
        return cls(record["__key__"], modality, [Turn(**t) for t in turns], files,
                   lookback=record.get("lookback.npy"), target=record.get("target.npy"), meta=meta)

    def text(self, role: str) -> str:
        """The first `role` turn's text: the question ("user") or the reference answer ("assistant")."""
        return next(t.text for t in self.turns if t.role == role)
