"""A minimal single-process language-model loop for the backbone: the smoke test of training from scratch.

Cluster training (Ray Train + DeepSpeed, phases I/II) is `pipelines/train.py`; this one exists to show, in
seconds on a CPU, that the official init and parameter groups learn.
"""

import codecs
import contextlib
import io
import math
from collections import Counter

import torch
import torch.nn.functional as F
from tqdm import tqdm

from modrwkv import RWKV7


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


def train_on_text(
    model: RWKV7, ids: list[int], steps: int = 200, ctx_len: int = 64, batch_size: int = 8, lr: float = 3e-3,
    seed: int = 0, progress: bool = False,
) -> list[float]:
    """Next-token training on random windows of `ids` with AdamW over the backbone's parameter groups."""
    if len(ids) < ctx_len + 1:
        raise ValueError(f"the text has {len(ids)} tokens; need more than ctx_len={ctx_len}")
    data = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    groups = model.optimizer_groups(weight_decay=0.01)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="train", disable=not progress):
        starts = torch.randint(0, len(ids) - ctx_len, (batch_size,), generator=generator)
        window = torch.stack([data[s : s + ctx_len + 1] for s in starts])
        logits, _ = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
