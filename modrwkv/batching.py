"""Cached samples -> model batches: the chat template, placeholder runs sized by each projector's
compression, right padding with an attention mask, labels only on assistant words (-100 elsewhere).

A sample longer than `max_length` tokens raises `OverLength`, or, with `skip_over_length`, is left out of its
batch and named in `Batch.skipped` (training's policy: one sample never stops a run; truncating would cut the
answer or split a media item, so it is skipped and reported instead)."""

from dataclasses import dataclass, field

import torch

from .conversation import right_pad, tokenize_conversation
from .multimodal import Features, ModRWKVConfig
from .sample import Sample
from .tokenizer import WorldTokenizer


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded with 0
    attention_mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B, T], IGNORE on padding, prompts and modality positions
    features: list[Features]
    series_target: torch.Tensor | None  # [B, horizon] (normalised) for forecasting batches
    sample_ids: list[str]
    series_lookback: torch.Tensor | None = None  # [B, lookback] (normalised) for forecasting batches
    skipped: list[dict] = field(default_factory=list)  # {"key", "tokens"} of samples left out (over max_length)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


class OverLength(ValueError):
    def __init__(self, key: str, tokens: int, max_length: int):
        super().__init__(f"sample {key}: {tokens} tokens, over the context length {max_length}")
        self.key, self.tokens = key, tokens


class Collator:
    def __init__(self, tokenizer: WorldTokenizer, config: ModRWKVConfig, max_length: int | None = None,
                 skip_over_length: bool = False):
        self.tokenizer, self.config, self.max_length = tokenizer, config, max_length
        self.skip_over_length = skip_over_length

    def item_length(self, modality: str, features: torch.Tensor, sample_id: str) -> int:
        if modality not in self.config.projectors:
            raise ValueError(f"sample {sample_id}: the model has no {modality} projector")
        return self.config.projectors[modality].compressed_length(features.shape[0])

    def encode(self, sample: Sample):
        items = sample.features()
        lengths = [self.item_length(m, f, sample.key) for m, f in items]
        ids, labels = tokenize_conversation(self.tokenizer, sample.turns, lengths, sample.key)
        if self.max_length and len(ids) > self.max_length:
            raise OverLength(sample.key, len(ids), self.max_length)
        as_tensor = lambda a: None if a is None else torch.from_numpy(a).float()  # noqa: E731
        return ids, labels, items, as_tensor(sample.target), as_tensor(sample.lookback)

    def __call__(self, samples: list[Sample]) -> Batch:
        kept, encoded, skipped = [], [], []
        for sample in samples:
            try:
                encoded.append(self.encode(sample))
            except OverLength as e:
                if not self.skip_over_length:
                    raise
                skipped.append({"key": e.key, "tokens": e.tokens})
                continue
            kept.append(sample)
        if not encoded:
            return Batch(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool),
                         torch.zeros(0, 0, dtype=torch.long), [], None, [], skipped=skipped)
        input_ids, mask, labels = right_pad([ids for ids, *_ in encoded], [lab for _, lab, *_ in encoded])
        targets = [t for *_, t, _ in encoded]
        if any(t is None for t in targets) != all(t is None for t in targets):
            raise ValueError("a batch mixes forecasting samples with others; batch each cache separately")
        series_target = None if targets[0] is None else torch.stack(targets)
        lookbacks = [lb for *_, lb in encoded]
        series_lookback = None if series_target is None or lookbacks[0] is None else torch.stack(lookbacks)
        return Batch(input_ids, mask, labels, [items for _, _, items, *_ in encoded], series_target,
                     [s.key for s in kept], series_lookback, skipped)
