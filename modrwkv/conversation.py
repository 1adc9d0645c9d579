"""The chat template and the token/label layout of a multimodal training sample.

    User: <image>\nWhat digit is this?\n\nAssistant: seven\n\n

Every modality placeholder in a user turn expands to as many positions as its (compressed) feature sequence
has vectors; the model writes the adapted features there. Labels: the assistant's words and its closing
"\n\n" are learned; user turns, the "Assistant:" prefix and modality positions get -100 (ignored). Rows of
ids (and labels) go into one batch right-padded, the layout every forward pass takes.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tokenizer import SPECIAL_TOKENS, WorldTokenizer

IGNORE = -100
PLACEHOLDER_IDS = {"image": SPECIAL_TOKENS["<image>"], "audio": SPECIAL_TOKENS["<audio>"], "series": SPECIAL_TOKENS["<series>"]}
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
    tokenizer: WorldTokenizer, turns: list[Turn], item_lengths: list[int], sample_id: str = "?"
) -> tuple[list[int], list[int]]:
    """(input_ids, labels), aligned: labels[t] is the target for input position t (shift when computing the loss)."""
    if not turns:
        raise ValueError(f"sample {sample_id}: no turns")
    ids, labels = [], []
    for turn in turns:
        if turn.role == "user":
            piece = tokenizer.encode(f"{ROLES['user']}: {turn.text}{TURN_END}", allow_special=True)
            ids += piece
            labels += [IGNORE] * len(piece)
        else:
            if any(s in turn.text for s in ("<image>", "<audio>", "<series>")):
                raise ValueError(f"sample {sample_id}: modality placeholders belong in user turns")
            prefix = tokenizer.encode(f"{ROLES['assistant']}:")
            answer = tokenizer.encode(f" {turn.text}{TURN_END}")
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


def prompt_ids(tokenizer: WorldTokenizer, user_text: str, item_lengths: list[int], sample_id: str = "?") -> list[int]:
    """A generation prompt: one user turn, then "Assistant:" for the model to continue. The same tokens as a
    training conversation that ends with that user turn (a forecasting sample), so a forecast head reads the
    position it was trained on."""
    return tokenize_conversation(tokenizer, [Turn("user", user_text)], item_lengths, sample_id)[0]


def right_pad(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None = None, device=None):
    """(ids [B, T] with 0 after each row's end, attention mask [B, T] bool, labels [B, T] with IGNORE after the
    end or None when no labels are given); T is the longest row."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every row needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    padded_labels = None if labels is None else torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[b, : len(row)] = True
        if labels is not None:
            padded_labels[b, : len(row)] = torch.as_tensor(list(labels[b]), dtype=torch.long)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
        padded_labels = None if padded_labels is None else padded_labels.to(device)
    return ids, mask, padded_labels
