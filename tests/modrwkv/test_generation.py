import pytest
import torch

from modrwkv import RWKV7Config
from modrwkv.generation import GenerationConfig, generate, prefill, sample
from tests.conftest import random_backbone

CFG = RWKV7Config(vocab_size=150, n_layer=2, n_embd=64, head_size=16)
PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16], [42]]


@pytest.fixture(scope="module")
def model():
    return random_backbone(CFG, seed=3)


def greedy_by_hand(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_batched_equals_full_recompute(model):
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=0, stop_tokens=()))
    for prompt, tokens in zip(PROMPTS, out.tokens):
        assert tokens == greedy_by_hand(model, prompt, 6)


def test_prompts_of_different_lengths_run_the_head_on_their_last_positions_only(model):
    seen = []
    hook = model.head.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    try:
        logits, _ = prefill(model, PROMPTS)
    finally:
        hook.remove()
    assert seen == [(3, CFG.n_embd)]  # one vector a row, not a [3, 7, vocab] block
    for row, prompt in enumerate(PROMPTS):
        alone, _ = model(torch.tensor([prompt]), logits_to_keep=1)
        torch.testing.assert_close(logits[row], alone[0, -1], atol=1e-5, rtol=1e-5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="logits_to_keep counts back from a row's last position: padding"):
        model(torch.tensor([[5, 6, 7, 0], [1, 2, 3, 4]]), attention_mask=mask, logits_to_keep=1)
    with pytest.raises(ValueError, match="the last sequence's in a packed row"):  # not each sequence's last
        model(torch.tensor([[5, 6, 7, 1, 2, 3, 4]]), cu_seqlens=torch.tensor([0, 3, 7]), logits_to_keep=1)


def test_stop_token_ends_only_its_row(model):
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=0, stop_tokens=()))
    stop = free.tokens[1][2]
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=0, stop_tokens=(stop,)))
    assert out.stopped[1]
    for row in range(3):
        expected = free.tokens[row][: free.tokens[row].index(stop)] if stop in free.tokens[row] else free.tokens[row]
        assert out.tokens[row] == expected
        assert out.stopped[row] == (stop in free.tokens[row])


def test_streaming_callback_sees_every_token_in_order(model):
    seen = {0: [], 1: [], 2: []}
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=11),
                   on_token=lambda row, tok: seen[row].append(tok))
    assert [seen[i] for i in range(3)] == out.tokens


def test_seeded_sampling_is_reproducible(model):
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.8, seed=5)
    assert generate(model, PROMPTS, cfg).tokens == generate(model, PROMPTS, cfg).tokens


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}
    assert int(sample(logits, 1.0, 0.01, g)) == 0
    assert int(sample(logits, 0.0, 1.0, g)) == 0


def test_returned_state_continues_the_sequence(model):
    out = generate(model, [PROMPTS[1]], GenerationConfig(max_new_tokens=4, temperature=0, stop_tokens=()))
    more = [3, 4]
    with torch.no_grad():
        continued, _ = model(torch.tensor([more]), state=out.state)
        full, _ = model(torch.tensor([PROMPTS[1] + out.tokens[0] + more]))
    torch.testing.assert_close(continued[0], full[0, -2:], rtol=1e-4, atol=1e-4)


def test_prefix_state_reuse_gives_the_same_answers(model):
    prefix = [9, 8, 7, 6, 5, 4]
    questions = [[20, 21], [30], [40, 41, 42]]
    cfg = GenerationConfig(max_new_tokens=5, temperature=0, stop_tokens=())
    _, prefix_state = prefill(model, [prefix])
    reused = [generate(model, [q], cfg, state=prefix_state.clone()).tokens[0] for q in questions]
    fresh = [generate(model, [prefix + q], cfg).tokens[0] for q in questions]
    assert reused == fresh


def test_bad_generation_arguments():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(random_backbone(CFG), [[]])


def test_generate_text_streams_whole_characters():
    from modrwkv.generation import generate_text
    from modrwkv.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    model = random_backbone(RWKV7Config(vocab_size=65536, n_layer=1, n_embd=32, head_size=16), seed=1)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3, stop_tokens=())
    pieces = []
    text = generate_text(model, tok, tok.encode("你好"), cfg, on_text=pieces.append)
    assert "".join(pieces) == text
    assert text == tok.decode(generate(model, [tok.encode("你好")], cfg).tokens[0])


def test_generate_text_ends_at_a_stop_text_and_cuts_it_off():
    from modrwkv.generation import generate_text
    from modrwkv.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    model = random_backbone(RWKV7Config(vocab_size=65536, n_layer=1, n_embd=32, head_size=16), seed=1)
    cfg = GenerationConfig(max_new_tokens=40, temperature=0, stop_tokens=())
    prompt = tok.encode("Hello")
    free = generate_text(model, tok, prompt, cfg)
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # two characters from the middle of the free text
    streamed = []
    cut = generate_text(model, tok, prompt, cfg, on_text=streamed.append, stop_texts=[stop, "never there"])
    assert cut == free[: free.find(stop)]
    assert "".join(streamed) == cut  # the stop text (and the start of it, held back) never streamed: chat showed it
    assert len(cut) + len(stop) < len(free)  # generation stopped early, not only the text cut


def test_a_tiny_temperature_samples_the_largest_logit_rather_than_failing():
    """logits / 1e-40 overflowed to inf and softmax gave NaN: torch.multinomial refused the row."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, -6.0]])
    assert sample(logits, 1e-40, 1.0, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    assert sample(logits, 1e-40, 0.5, torch.Generator().manual_seed(0)).tolist() == [1, 0]
