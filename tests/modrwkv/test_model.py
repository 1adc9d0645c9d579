import pytest
import torch

import modrwkv_kernels as kernels
from modrwkv import RWKV7, RWKV7Config, RWKV7State
from tests.conftest import random_backbone

TINY = RWKV7Config(vocab_size=97, n_layer=2, n_embd=64, head_size=16)


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@torch.no_grad()
def test_right_padded_batch_equals_separate_runs():
    model = random_backbone(TINY)
    seqs = [torch.randint(0, 97, (n,)) for n in (23, 9, 1)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    logits, state = model(ids, attention_mask=mask)
    for i, s in enumerate(seqs):
        ref_logits, ref_state = model(s[None])
        assert rel_err(logits[i, : len(s)], ref_logits[0]) < 1e-5
        for field in ("att_shift", "wkv", "ffn_shift"):
            assert rel_err(getattr(state, field)[:, i], getattr(ref_state, field)[:, 0]) < 1e-5


def test_attention_mask_must_be_right_padded():
    model = random_backbone(TINY)
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))


def test_token_ids_out_of_range_are_reported():
    model = random_backbone(TINY)
    with pytest.raises(ValueError, match=r"out of range \[0, 97\).*\[97, 120\]"):
        model(torch.tensor([[1, 97, 120]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1]]))


def test_parallel_gradients_match_fp64_reference(monkeypatch):
    """The fp32 parallel forward (chunked backend) against the fp64 per-step recurrence, gradients included."""
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(2))

    def grads(model, backend):
        monkeypatch.setenv("MODRWKV_WKV7_BACKEND", backend)
        model.zero_grad()
        logits, _ = model(ids)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 97).double(), target.reshape(-1)).backward()
        return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    model32 = random_backbone(TINY).train()
    model64 = random_backbone(TINY).double().train()
    g32, g64 = grads(model32, "chunked"), grads(model64, "reference")
    assert g32.keys() == g64.keys() and len(g64) == len(list(model64.parameters())) - 3  # layer 0: v0, v1, v2 unused
    for name in g64:
        scale = g64[name].abs().max()
        if scale > 0:
            assert (g32[name] - g64[name]).abs().max() / scale < 1e-3, name


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(3))
    out = []
    for ckpt in (False, True):
        model = random_backbone(TINY).train()
        model.gradient_checkpointing = ckpt
        logits, _ = model(ids)
        logits.square().mean().backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in out[0]:
        torch.testing.assert_close(out[0][name], out[1][name], rtol=1e-5, atol=1e-7)


def test_a_forward_reads_every_parameter_but_those_named_unread():
    """Training touches only the backbone's unread tensors (x0) to keep ZeRO's reduction whole; any other tensor
    without a gradient after a forward and backward would be left out of it."""
    model = random_backbone(TINY).train()
    logits, _ = model(torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(4)))
    logits.square().mean().backward()
    unread = {id(p) for p in model.unread_parameters()}
    assert len(unread) == 3
    for name, p in model.named_parameters():
        assert (p.grad is None) == (id(p) in unread), name


@torch.no_grad()
def test_inputs_embeds_equals_input_ids():
    model = random_backbone(TINY)
    ids = torch.randint(0, 97, (2, 11))
    a, _ = model(ids)
    b, _ = model(inputs_embeds=model.emb(ids))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.emb(ids))


@torch.no_grad()
def test_state_is_constant_size_and_reusable():
    model = random_backbone(TINY)
    prefix = torch.randint(0, 97, (1, 30))
    _, state = model(prefix)
    assert state.nbytes() == model.zero_state(1).nbytes()
    fan = state.select([0, 0, 0])
    questions = torch.randint(0, 97, (3, 5))
    batched, _ = model(questions, state=fan)
    for i in range(3):
        alone, _ = model(questions[i : i + 1], state=state.clone())
        assert rel_err(batched[i], alone[0]) < 1e-5
        full, _ = model(torch.cat([prefix, questions[i : i + 1]], dim=1))
        assert rel_err(batched[i], full[0, -5:]) < 1e-4


PACKED_LENGTHS = (5, 1, 23, 17)  # a single token, and sequences across the chunked kernel's 16-step chunks


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *lengths]).cumsum(0)


def random_state(model: RWKV7, rows: int) -> RWKV7State:
    g = torch.Generator().manual_seed(7)
    zero = model.zero_state(rows)
    return RWKV7State(*(torch.randn(x.shape, generator=g).mul(0.5).requires_grad_()
                        for x in (zero.att_shift, zero.wkv, zero.ffn_shift)))


@pytest.mark.parametrize("backend", ["reference", "chunked", pytest.param("triton", marks=pytest.mark.slow),
                                     "triton_chunked"])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_row_equals_separate_runs_forward_and_backward(monkeypatch, backend, with_state):
    """Sequences of 5, 1, 23 and 17 tokens packed in one row: the logits, the final states and the gradients of
    every parameter, of the input embeddings and of the initial states equal one run per sequence (fp32, 1e-5)."""
    monkeypatch.setenv(kernels.BACKEND_ENV, backend)
    model = random_backbone(TINY).train()
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, n, 64, generator=g).requires_grad_() for n in PACKED_LENGTHS]
    state = random_state(model, len(PACKED_LENGTHS)) if with_state else None
    weights = torch.randn(1, sum(PACKED_LENGTHS), 97, generator=g)  # every logit counts, each differently
    leaves = embeds + ([state.att_shift, state.wkv, state.ffn_shift] if with_state else [])

    def gradients():
        grads = [x.grad.clone() for x in leaves] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        for x in leaves:
            x.grad = None
        return grads

    def squares(s: RWKV7State):
        return (s.att_shift**2).sum() + (s.wkv**2).sum() + (s.ffn_shift**2).sum()

    separate = [model(inputs_embeds=x, state=state.select([i]) if with_state else None)
                for i, x in enumerate(embeds)]
    sep_logits = torch.cat([logits for logits, _ in separate], dim=1)
    sep_states = [torch.cat([getattr(s, f) for _, s in separate], dim=1) for f in ("att_shift", "wkv", "ffn_shift")]
    ((sep_logits * weights).sum() + sum(squares(s) for _, s in separate)).backward()
    sep_grads = gradients()

    logits, packed_state = model(inputs_embeds=torch.cat(embeds, dim=1), state=state,
                                 cu_seqlens=offsets(PACKED_LENGTHS))
    ((logits * weights).sum() + squares(packed_state)).backward()
    assert packed_state.batch_size == len(PACKED_LENGTHS) and logits.shape == sep_logits.shape
    assert rel_err(logits, sep_logits) < 1e-5
    for got, want in zip((packed_state.att_shift, packed_state.wkv, packed_state.ffn_shift), sep_states):
        assert rel_err(got, want) < 1e-5
    packed_grads = gradients()
    # every parameter but the embedding (inputs_embeds are given) and layer 0's unused v0, v1, v2
    assert len(packed_grads) == len(sep_grads) == len(leaves) + len(list(model.parameters())) - 4
    for got, want in zip(packed_grads, sep_grads):
        assert rel_err(got, want) < 1e-5


def test_a_packed_sequence_reaches_no_other():
    """New tokens in the middle sequence change no logit or final state of the others, bit for bit; the last
    sequence's logits have exactly zero gradient on every earlier sequence's input."""
    model = random_backbone(TINY).train()
    lengths = (9, 20, 7)
    cu_seqlens = offsets(lengths)
    ids = torch.randint(0, 97, (1, 36), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 9:29] = (ids[0, 9:29] + 1) % 97
    with torch.no_grad():
        logits, state = model(ids, cu_seqlens=cu_seqlens)
        logits2, state2 = model(changed, cu_seqlens=cu_seqlens)
    others = torch.tensor([True] * 9 + [False] * 20 + [True] * 7)
    assert torch.equal(logits2[:, others], logits[:, others])
    assert not torch.equal(logits2[:, ~others], logits[:, ~others])
    for field in ("att_shift", "wkv", "ffn_shift"):
        assert torch.equal(getattr(state2, field)[:, [0, 2]], getattr(state, field)[:, [0, 2]])
    embeds = model.emb(ids).detach().requires_grad_()
    logits, _ = model(inputs_embeds=embeds, cu_seqlens=cu_seqlens)
    logits[:, 29:].square().sum().backward()
    assert embeds.grad[:, :29].abs().max() == 0 and embeds.grad[:, 29:].abs().max() > 0


def test_bad_packed_input_is_named():
    model = random_backbone(TINY)
    with pytest.raises(ValueError, match="one row without padding: got 2 rows"):
        model(torch.zeros(2, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="and an attention_mask"):
        model(torch.zeros(1, 6, dtype=torch.long), attention_mask=torch.ones(1, 6), cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to T=6"):
        model(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="state holds 1 sequences but the input has 2"):
        model(torch.zeros(1, 6, dtype=torch.long), state=model.zero_state(1), cu_seqlens=torch.tensor([0, 2, 6]))


def test_init_matches_official_formulas():
    cfg = RWKV7Config(vocab_size=300, n_layer=4, n_embd=128, head_size=32)
    model = RWKV7(cfg).init_weights()
    C, L = 128, 4
    att = model.blocks[2].att
    ddd = torch.arange(C) / C
    torch.testing.assert_close(att.x_r.view(-1), (1 - ddd ** (0.2 * (1 - 2 / L))).float())
    assert torch.all(att.output.weight == 0) and torch.all(model.blocks[1].ffn.value.weight == 0)
    assert torch.all(att.w1 == 0) and att.w2.abs().max() > 0
    torch.testing.assert_close(att.ln_x.weight, torch.full((C,), (3 / L) ** 0.7))
    assert torch.all(att.k_a == 1.02) and torch.all(att.r_k == -0.04)
    assert model.emb.weight.abs().max() <= 1e-4
    n = torch.arange(C, dtype=torch.float64)
    zigzag = ((n % 32) - 15.5) / 15.5
    zigzag = zigzag * zigzag.abs()
    w0 = -6 + 6 * (n / (C - 1)) ** (1 + (2 / 3) ** 0.3) + 0.5 + 2.5 * zigzag
    torch.testing.assert_close(att.w0.view(-1), w0.float())
    # orthogonal gains as in RWKV-LM: orthonormal columns scaled by the gain (no extra factor for tall matrices)
    head_norms = model.head.weight.norm(dim=0)
    torch.testing.assert_close(head_norms, torch.full_like(head_norms, 0.5 * (300 / C) ** 0.5))
    ffn_key_norms = model.blocks[0].ffn.key.weight.norm(dim=0)  # [4C, C]
    torch.testing.assert_close(ffn_key_norms, torch.ones_like(ffn_key_norms))
    torch.testing.assert_close(att.key.weight @ att.key.weight.t(), 0.01 * torch.eye(C), atol=1e-5, rtol=0)
    # LoRA ranks for the 0.1B width follow RWKV-LM's rule: w/a 64, v 32, g 128
    big = RWKV7Config(n_layer=1, n_embd=768)
    assert (big.decay_lora, big.a_lora, big.v_lora, big.gate_lora) == (64, 64, 32, 128)


def test_optimizer_groups():
    model = random_backbone(TINY)
    groups = model.optimizer_groups(weight_decay=0.1)
    by_scale = {(g["lr_scale"], g["weight_decay"]): g["params"] for g in groups}
    w0s = {id(b.att.w0) for b in model.blocks}
    assert {id(p) for p in by_scale[(2.0, 0.0)]} == w0s
    decayed = {id(p) for p in by_scale[(1.0, 0.1)]}
    assert id(model.blocks[0].att.key.weight) in decayed and id(model.head.weight) in decayed
    assert id(model.blocks[0].att.w1) not in decayed and id(model.blocks[0].ln1.weight) not in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_packed_forward_reads_nothing_back_whatever_the_depth(monkeypatch, device_reads):
    """Given its ids and offsets on the host (as training gives them), a packed forward checks and lays them out
    there and reads nothing back from the device, for 2 layers or 6; the kernel gets one layout object in every
    layer. The row backend is replaced by a stand-in that records what it gets, so only the model's and the
    dispatcher's own reads are counted."""
    seen = []

    def row_backend(r, w, k, v, a, b, initial_state, layout):
        seen.append(layout)
        return torch.zeros_like(r, dtype=torch.float32), initial_state.float()

    monkeypatch.setitem(kernels.BACKENDS, "triton", row_backend)
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    ids = torch.randint(0, 97, (1, sum(PACKED_LENGTHS)), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0, *PACKED_LENGTHS]).cumsum(0)
    for n_layer in (2, 6):
        model = random_backbone(RWKV7Config(vocab_size=97, n_layer=n_layer, n_embd=64, head_size=16))
        seen.clear()
        model(ids, cu_seqlens=cu_seqlens)
        assert device_reads == []
        assert len(seen) == n_layer and all(layout is seen[0] for layout in seen)
        assert seen[0].lengths == PACKED_LENGTHS


def test_right_padded_forward_reads_nothing_back(device_reads):
    model = random_backbone(RWKV7Config(vocab_size=97, n_layer=2, n_embd=64, head_size=16))
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(20)[None] < torch.tensor([[20], [7], [13]])
    logits, _ = model(ids, attention_mask=mask)
    logits.sum().backward()
    assert device_reads == []
