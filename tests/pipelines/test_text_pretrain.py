"""Training from scratch with the official init: a 2-layer model learns a small real text."""

import math

import torch

from modrwkv import RWKV7, RWKV7Config
from pipelines.text_pretrain import bundled_text, train_on_text, unigram_entropy


def test_two_layers_learn_a_text_well_below_unigram_entropy():
    torch.manual_seed(0)
    text = bundled_text()
    ids = list(text.encode("utf-8"))  # byte-level: small vocabulary, a few hundred steps in seconds
    model = RWKV7(RWKV7Config(vocab_size=256, n_layer=2, n_embd=64, head_size=16)).init_weights()
    losses = train_on_text(model, ids, steps=300, ctx_len=64, batch_size=8, lr=3e-3)
    assert all(math.isfinite(x) for x in losses)
    entropy = unigram_entropy(ids)
    final = sum(losses[-20:]) / 20
    assert 0.9 * math.log(256) < losses[0] < 1.1 * math.log(256)  # starts near uniform, as the official init does
    assert final < 0.5 * entropy, (final, entropy)


def test_unigram_entropy_by_hand():
    assert abs(unigram_entropy([1, 1, 2, 2]) - math.log(2)) < 1e-12
    assert unigram_entropy([3, 3, 3]) == 0
