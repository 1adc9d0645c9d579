"""Minimal single-process loops for the backbone alone: language modelling on a text, and the same plus
instruction turns (the demo's stand-in for a pretrained instruct LM).

The steps are the training core's (`trainer.py`: its AdamW recipe and engine) on text batches instead of
feature-cache ones; these loops exist to show, in seconds on a CPU, that the official init and parameter groups
learn, and to give the demo a backbone that already follows the chat template before any modality is added.
"""

import codecs
import contextlib
import io
import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from modrwkv import RWKV7
from modrwkv.batching import right_pad
from modrwkv.conversation import IGNORE, Turn, tokenize_conversation
from modrwkv.tokenizer import WorldTokenizer

from .trainer import LocalEngine, adamw


def bundled_text() -> str:
    """The Zen of Python, as shipped (rot13-encoded) in the standard library's `this` module."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the poem
        import this
    return codecs.decode(this.s, "rot13")


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context."""
    counts = Counter(ids)
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def text_loss(model: RWKV7, data: torch.Tensor, ctx_len: int, batch_size: int, generator) -> torch.Tensor:
    """Next-token loss on `batch_size` random windows of `data`."""
    starts = torch.randint(0, len(data) - ctx_len, (batch_size,), generator=generator)
    window = torch.stack([data[s : s + ctx_len + 1] for s in starts]).to(model.emb.weight.device)
    logits, _ = model(window[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))


def chat_loss(model: RWKV7, tokenizer: WorldTokenizer, chats: list[list[Turn]]) -> torch.Tensor:
    """Loss on the assistant's words only (the chat template's labels); the head runs on those positions alone."""
    encoded = [tokenize_conversation(tokenizer, turns, []) for turns in chats]
    ids, mask, labels = right_pad([row for row, _ in encoded], [row_labels for _, row_labels in encoded],
                                  device=model.emb.weight.device)
    hidden, _ = model.forward_hidden(ids, attention_mask=mask)
    targets = labels[:, 1:]
    learned = targets != IGNORE
    return F.cross_entropy(model.head(hidden[:, :-1][learned]).float(), targets[learned])


def check_length(ids: list[int], ctx_len: int) -> None:
    if len(ids) < ctx_len + 1:
        raise ValueError(f"the text has {len(ids)} tokens; need more than ctx_len={ctx_len}")


def optimise(model: RWKV7, losses: Callable[[], list[torch.Tensor]], steps: int, lr: float, desc: str,
             progress: bool) -> list[list[float]]:
    """`steps` steps of the training core's engine (AdamW over the backbone's parameter groups, clipped at 1) on
    the sum of `losses()`; returns every step's loss parts."""
    # the loop form of AdamW, not the fused one of phase I/II: the demo's stand-in (and its figures) came from it
    # eps 1e-8: the demo's stand-in backbone was tuned with it (RESULTS.md); phases I and II take RWKV-LM's 1e-18
    optimizer = adamw(model.optimizer_groups(weight_decay=0.01), lr, fused=False, eps=1e-8)
    engine = LocalEngine(model, optimizer, accumulation=1, grad_clip=1.0)
    model.train()
    history = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        parts = losses()
        engine.backward(sum(parts))
        engine.step()
        history.append([p.item() for p in parts])
    model.eval()
    return history


def train_on_text(
    model: RWKV7, ids: list[int], steps: int = 200, ctx_len: int = 64, batch_size: int = 8, lr: float = 3e-3,
    seed: int = 0, progress: bool = False,
) -> list[float]:
    """Next-token training on random windows of `ids`; returns the loss per step."""
    check_length(ids, ctx_len)
    data, generator = torch.tensor(ids, dtype=torch.long), torch.Generator().manual_seed(seed)
    history = optimise(model, lambda: [text_loss(model, data, ctx_len, batch_size, generator)], steps, lr,
                       "train", progress)
    return [text for text, in history]


def train_on_chats(
    model: RWKV7, tokenizer: WorldTokenizer, ids: list[int], sample_chat: Callable[[], list[Turn]],
    steps: int = 200, chat_batch: int = 16, text_batch: int = 2, ctx_len: int = 64, lr: float = 3e-3,
    seed: int = 0, progress: bool = False,
) -> list[tuple[float, float]]:
    """Each step: next-token loss on `text_batch` windows of `ids` plus the assistant-only loss on `chat_batch`
    conversations from `sample_chat()`. Returns (text loss, chat loss) per step."""
    check_length(ids, ctx_len)
    data, generator = torch.tensor(ids, dtype=torch.long), torch.Generator().manual_seed(seed)

    def losses():
        return [text_loss(model, data, ctx_len, text_batch, generator),
                chat_loss(model, tokenizer, [sample_chat() for _ in range(chat_batch)])]

    return [(text, chat) for text, chat in optimise(model, losses, steps, lr, "instruct", progress)]
