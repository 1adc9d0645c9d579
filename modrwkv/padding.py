"""Right-padding token rows into one batch: the layout every forward pass takes (`attention_mask` is ones, then
zeros, in each row)."""

from collections.abc import Sequence

import torch

from .conversation import IGNORE


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
