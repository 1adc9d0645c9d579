"""Cached samples -> model batches: the chat template, placeholder runs sized by each projector's
compression, right padding with an attention mask, labels only on assistant words (-100 elsewhere)."""

from dataclasses import dataclass

import torch

from .conversation import IGNORE, Turn, tokenize_conversation
from .multimodal import Features, ModRWKVConfig
from .tokenizer import WorldTokenizer


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded with 0
    attention_mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B, T], IGNORE on padding, prompts and modality positions
    features: list[Features]
    series_target: torch.Tensor | None  # [B, horizon] (normalised) for forecasting batches
    sample_ids: list[str]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def sample_items(sample: dict) -> Features:
    """A cached sample's feature items (arrays item0, item1, ...) in order, as (modality, float tensor) pairs."""
    names = sorted((n for n in sample["arrays"] if n.startswith("item")), key=lambda n: int(n[4:]))
    return [(sample["meta"]["modality"], torch.from_numpy(sample["arrays"][n]).float()) for n in names]


class Collator:
    def __init__(self, tokenizer: WorldTokenizer, config: ModRWKVConfig, max_length: int | None = None):
        self.tokenizer, self.config, self.max_length = tokenizer, config, max_length

    def item_length(self, modality: str, features: torch.Tensor, sample_id: str) -> int:
        if modality not in self.config.projectors:
            raise ValueError(f"sample {sample_id}: the model has no {modality} projector")
        return self.config.projectors[modality].compressed_length(features.shape[0])

    def encode(self, sample: dict):
        key, meta = sample["key"], sample["meta"]
        items = sample_items(sample)
        lengths = [self.item_length(m, f, key) for m, f in items]
        ids, labels = tokenize_conversation(self.tokenizer, [Turn(**t) for t in meta["turns"]], lengths, key)
        if self.max_length and len(ids) > self.max_length:
            raise ValueError(f"sample {key}: {len(ids)} tokens, over the context length {self.max_length}")
        target = sample["arrays"].get("target")
        return ids, labels, items, None if target is None else torch.from_numpy(target).float()

    def __call__(self, samples: list[dict]) -> Batch:
        encoded = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, *_ in encoded)
        B = len(encoded)
        input_ids = torch.zeros(B, width, dtype=torch.long)
        labels = torch.full((B, width), IGNORE, dtype=torch.long)
        mask = torch.zeros(B, width, dtype=torch.bool)
        for b, (ids, lab, _, _) in enumerate(encoded):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(lab)] = torch.tensor(lab)
            mask[b, : len(ids)] = True
        targets = [t for *_, t in encoded]
        if any(t is None for t in targets) != all(t is None for t in targets):
            raise ValueError("a batch mixes forecasting samples with others; batch each cache separately")
        series_target = None if targets[0] is None else torch.stack(targets)
        return Batch(input_ids, mask, labels, [items for _, _, items, _ in encoded], series_target,
                     [s["key"] for s in samples])
