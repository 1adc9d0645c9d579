"""Training from scratch with the official init: a 2-layer model learns a small real text, and the demo's
instruction turns teach it to answer from the user's turn."""

import math

import pytest
import torch

from modrwkv import RWKV7, RWKV7Config
from modrwkv.conversation import prompt_ids
from modrwkv.tokenizer import WorldTokenizer
from pipelines.demo_backbone import context_questions
from pipelines.text_pretrain import bundled_text, train_on_chats, train_on_text, unigram_entropy


@pytest.mark.slow
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


@pytest.mark.slow
def test_instruction_turns_teach_answering_from_the_users_turn():
    torch.manual_seed(0)
    tokenizer = WorldTokenizer()
    model = RWKV7(RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)).init_weights()
    losses = train_on_chats(model, tokenizer, tokenizer.encode(bundled_text()), context_questions(seed=0),
                            steps=150, chat_batch=16, text_batch=1, ctx_len=32)
    chat = [c for _, c in losses]
    assert sum(chat[-10:]) / 10 < 0.3 * chat[0], chat[::15]
    fresh = context_questions(seed=1)  # other draws: the answer must come from the prompt, not from memory
    correct = 0
    for _ in range(40):
        user, assistant = fresh()
        logits, _ = model(torch.tensor([prompt_ids(tokenizer, user.text, [])]), logits_to_keep=1)
        correct += int(logits[0, -1].argmax()) == tokenizer.encode(" " + assistant.text)[0]
    assert correct >= 30, correct
