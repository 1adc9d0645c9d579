"""Cached samples -> model batches: the chat template, placeholder runs sized by each projector's
compression, labels only on assistant words (-100 elsewhere), and one of two layouts: right padding with an
attention mask (`Collator.__call__`), or packed, the samples end to end in one row with their offsets
(`Collator.pack`, rows of up to `max_length` tokens filled by `first_fit_decreasing`).

A sample longer than `max_length` tokens raises `OverLength`, one with an item its projector compresses to no
position (fewer feature vectors than the compression kernel: 50 ms of audio is 2 WavLM frames) `TooShort`, one
with neither an answer nor a forecast target `NoAnswer`; with `skip_bad_samples` each is left out of its batch and
named, with the reason, in `Batch.skipped` (training's policy: one sample never stops a run; truncating would cut
the answer or split a media item, so it is skipped and reported instead).

The cached sample itself (`Sample`, its shard record) is the conversation format's: `modrwkv/conversation.py`.
`right_pad` lays rows of ids (and labels) into one right-padded batch, the layout every padded forward takes.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .conversation import IGNORE, Sample, tokenize_conversation
from .multimodal import Features, ModRWKVConfig
from .tokenizer import WorldTokenizer


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded with 0; packed: [1, T], the samples end to end
    attention_mask: torch.Tensor | None  # [B, T] bool; None when packed (no position is padding)
    labels: torch.Tensor  # [B, T] (packed: [1, T]), IGNORE on padding, prompts and modality positions
    features: list[Features]  # per sample
    series_target: torch.Tensor | None  # [B, horizon] (normalised) for forecasting batches, a row per sample
    sample_ids: list[str]
    series_lookback: torch.Tensor | None = None  # [B, lookback] (normalised) for forecasting batches
    skipped: list[dict] = field(default_factory=list)  # BadSample.record of each sample left out
    cu_seqlens: torch.Tensor | None = None  # packed: [samples + 1] offsets of the samples in the row
    slots: int = 0  # token positions of the layout: B x T padded; packed: rows x max_length, filled or not
    n_tokens: int = 0  # the samples' tokens, padding not counted

    @property
    def padding_fraction(self) -> float:
        """The share of the layout's positions that hold no sample token: right padding, or the rows' unfilled
        ends (a packed row is computed only as far as it is filled; the fraction says how well it was packed)."""
        return 1.0 - self.n_tokens / self.slots if self.slots else 0.0


class BadSample(ValueError):
    """A sample the model cannot take, which training leaves out (`skip_bad_samples`): `record` names it and why,
    {"key", "reason", and the reason's figures}."""

    reason = ""  # in the record, and training's metric skipped_<reason>

    def __init__(self, message: str, key: str, **figures):
        super().__init__(message)
        self.key, self.record = key, {"key": key, "reason": self.reason, **figures}


class OverLength(BadSample):
    reason = "over_length"

    def __init__(self, key: str, tokens: int, max_length: int):
        super().__init__(f"sample {key}: {tokens} tokens, over the context length {max_length}", key, tokens=tokens)
        self.tokens = tokens


class TooShort(BadSample):
    reason = "too_short"

    def __init__(self, key: str, modality: str, item: int, vectors: int, kernel: int):
        super().__init__(f"sample {key}: its {modality} item {item} has {vectors} feature vectors, none left after "
                         f"the projector's compression (kernel {kernel})", key, modality=modality, item=item,
                         vectors=vectors, kernel=kernel)


class NoAnswer(BadSample):
    reason = "no_answer"

    def __init__(self, key: str):
        # encoding rejects these since 2026-12-07; a cache written before may hold them, and a micro-batch of them
        # alone would have no loss to step on
        super().__init__(f"sample {key}: no assistant turn and no forecast target: nothing to learn", key)


SKIP_REASONS = (OverLength.reason, TooShort.reason, NoAnswer.reason)


@dataclass
class Encoded:
    """A sample as the model reads it: token ids and labels (placeholder runs sized), its features and series."""

    sample: Sample
    ids: list[int]
    labels: list[int]
    items: Features
    target: torch.Tensor | None
    lookback: torch.Tensor | None


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity`: the longest first, each into the first
    bin with room for it, a new bin when none has. Deterministic (equal lengths keep their order)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        first = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if first is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[first].append(i)
            room[first] -= lengths[i]
    return bins


def item_lengths(config: ModRWKVConfig, items: Features, sample_id: str) -> list[int]:
    """Each item's placeholder run: its feature vectors after its projector's compression. An item compressed to
    none raises `TooShort` (the model would have no position to write it at)."""
    lengths = []
    for index, (modality, features) in enumerate(items):
        if modality not in config.projectors:
            raise ValueError(f"sample {sample_id}: the model has no {modality} projector")
        projector = config.projectors[modality]
        length = projector.compressed_length(features.shape[0])
        if length == 0:
            raise TooShort(sample_id, modality, index, features.shape[0], projector.kernel)
        lengths.append(length)
    return lengths


class Collator:
    def __init__(self, tokenizer: WorldTokenizer, config: ModRWKVConfig, max_length: int | None = None,
                 skip_bad_samples: bool = False):
        self.tokenizer, self.config, self.max_length = tokenizer, config, max_length
        self.skip_bad_samples = skip_bad_samples

    def encode(self, sample: Sample) -> Encoded:
        items = sample_features(sample)
        ids, labels = tokenize_conversation(self.tokenizer, sample.turns,
                                            item_lengths(self.config, items, sample.key), sample.key)
        if sample.target is None and all(label == IGNORE for label in labels):
            raise NoAnswer(sample.key)
        if self.max_length and len(ids) > self.max_length:
            raise OverLength(sample.key, len(ids), self.max_length)
        as_tensor = lambda a: None if a is None else torch.from_numpy(a).float()  # noqa: E731
        return Encoded(sample, ids, labels, items, as_tensor(sample.target), as_tensor(sample.lookback))

    def encode_all(self, samples: list[Sample]) -> tuple[list[Encoded], list[dict]]:
        """(the samples the model takes, encoded; the records of those left out) under the bad-sample policy."""
        encoded, skipped = [], []
        for sample in samples:
            try:
                encoded.append(self.encode(sample))
            except BadSample as e:
                if not self.skip_bad_samples:
                    raise
                skipped.append(e.record)
        return encoded, skipped

    def __call__(self, samples: list[Sample]) -> Batch:
        """One right-padded row per sample."""
        encoded, skipped = self.encode_all(samples)
        if not encoded:
            return Batch(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool),
                         torch.zeros(0, 0, dtype=torch.long), [], None, [], skipped=skipped)
        input_ids, mask, labels = right_pad([e.ids for e in encoded], [e.labels for e in encoded])
        return Batch(input_ids, mask, labels, [e.items for e in encoded], sample_ids=[e.sample.key for e in encoded],
                     skipped=skipped, slots=input_ids.numel(), n_tokens=sum(len(e.ids) for e in encoded),
                     **self.series(encoded))

    def pack(self, rows: list[list[Encoded]], skipped: list[dict] | None = None) -> Batch:
        """Rows of samples (each row at most max_length tokens, e.g. from `first_fit_decreasing`) laid end to end
        in one packed row [1, T] with the samples' offsets: rows are a token budget, not a layout, so nothing is
        padded. Labels at each sample's first token stay as tokenised (the model drops the target across a
        boundary)."""
        encoded = [e for row in rows for e in row]
        if not encoded:
            raise ValueError("nothing to pack")
        for row in rows:
            if self.max_length and sum(len(e.ids) for e in row) > self.max_length:
                raise ValueError(f"a row of {sum(len(e.ids) for e in row)} tokens, over max_length {self.max_length}")
        input_ids = torch.tensor([[t for e in encoded for t in e.ids]])
        labels = torch.tensor([[t for e in encoded for t in e.labels]])
        cu_seqlens = torch.tensor([0] + [len(e.ids) for e in encoded]).cumsum(0)
        slots = len(rows) * self.max_length if self.max_length else input_ids.numel()
        return Batch(input_ids, None, labels, [e.items for e in encoded], sample_ids=[e.sample.key for e in encoded],
                     skipped=skipped or [], cu_seqlens=cu_seqlens, slots=slots, n_tokens=input_ids.shape[1],
                     **self.series(encoded))

    @staticmethod
    def series(encoded: list[Encoded]) -> dict:
        """series_target and series_lookback: forecasting samples' horizons and lookbacks, stacked (else None)."""
        targets = [e.target for e in encoded]
        if any(t is None for t in targets) != all(t is None for t in targets):
            raise ValueError("a batch mixes forecasting samples with others; batch each cache separately")
        series_target = None if targets[0] is None else torch.stack(targets)
        lookbacks = [e.lookback for e in encoded]
        series_lookback = None if series_target is None or lookbacks[0] is None else torch.stack(lookbacks)
        return {"series_target": series_target, "series_lookback": series_lookback}


def sample_features(sample: Sample) -> Features:
    """A sample's items as the model takes them: (modality, float tensor) pairs, in placeholder order."""
    return [(sample.modality, torch.from_numpy(a).float()) for a in sample.items]


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
