"""The backbone equals the official `rwkv` package's RWKV-7 inference on the same random checkpoints."""

import pytest
import torch

import modrwkv_kernels as kernels
from modrwkv import RWKV7, RWKV7Config

SHAPES = [
    RWKV7Config(vocab_size=512, n_layer=2, n_embd=128, head_size=64),  # 2 heads of 64
    RWKV7Config(vocab_size=1000, n_layer=3, n_embd=192, head_size=32),  # 6 heads of 32
]
TOL = 1e-4


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=range(len(SHAPES)), ids=["L2-C128-H2", "L3-C192-H6"])
def pair(request, tmp_path_factory):
    from rwkv.model import RWKV  # RWKV_V7_ON is set in conftest before this import

    from tests.conftest import random_backbone

    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save(random_backbone(SHAPES[request.param], seed=request.param).state_dict(), path)
    official = RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32")
    ours = RWKV7.from_pretrained(path)
    ids = torch.randint(0, SHAPES[request.param].vocab_size, (45,), generator=torch.Generator().manual_seed(7)).tolist()
    ref_logits, ref_state = official.forward(ids, None, full_output=True)
    return ours, ids, ref_logits, ref_state


# the step-by-step Triton kernel, interpreted on CPU, takes 10 s a check: the full suite runs it
@pytest.fixture(params=["reference", "chunked", pytest.param("triton", marks=pytest.mark.slow), "triton_chunked"])
def backend(request, monkeypatch):
    if request.param.startswith("triton") and torch.cuda.is_available():
        pytest.skip("these CPU-tensor checks run Triton only under its interpreter; tests/modrwkv_kernels runs it on CUDA")
    monkeypatch.setenv(kernels.BACKEND_ENV, request.param)
    return request.param


def assert_state_equal(state, ref_state, n_layer):
    for i in range(n_layer):
        assert rel_err(state.att_shift[i, 0], ref_state[3 * i]) < TOL
        assert rel_err(state.wkv[i, 0], ref_state[3 * i + 1]) < TOL
        assert rel_err(state.ffn_shift[i, 0], ref_state[3 * i + 2]) < TOL


@torch.no_grad()
def test_whole_sequence(pair, backend):
    ours, ids, ref_logits, ref_state = pair
    logits, state = ours(torch.tensor([ids]))
    assert rel_err(logits[0], ref_logits) < TOL
    assert_state_equal(state, ref_state, ours.config.n_layer)


# a Triton launch per token and layer under the interpreter: seconds; tests/modrwkv_kernels checks one-step calls
@pytest.mark.parametrize("backend", ["reference", "chunked", *(pytest.param(name, marks=pytest.mark.slow)
                                                          for name in ("triton", "triton_chunked"))],
                         indirect=True)
@torch.no_grad()
def test_token_by_token(pair, backend):
    ours, ids, ref_logits, ref_state = pair
    state, rows = None, []
    for t in ids:
        logits, state = ours(torch.tensor([[t]]), state=state)
        rows.append(logits[0, -1])
    assert rel_err(torch.stack(rows), ref_logits) < TOL
    assert_state_equal(state, ref_state, ours.config.n_layer)


@torch.no_grad()
def test_chunks_with_carried_state(pair, backend):
    ours, ids, ref_logits, ref_state = pair
    state, parts = None, []
    for start, end in ((0, 7), (7, 30), (30, 31), (31, 45)):
        logits, state = ours(torch.tensor([ids[start:end]]), state=state)
        parts.append(logits[0])
    assert rel_err(torch.cat(parts), ref_logits) < TOL
    assert_state_equal(state, ref_state, ours.config.n_layer)


@torch.no_grad()
def test_last_position_prefill_matches_official_default(pair):
    """The official forward returns only the last position's logits by default; logits_to_keep=1 matches it."""
    ours, ids, ref_logits, _ = pair
    logits, _ = ours(torch.tensor([ids]), logits_to_keep=1)
    assert logits.shape == (1, 1, ours.config.vocab_size)
    assert rel_err(logits[0, 0], ref_logits[-1]) < TOL


@torch.no_grad()
def test_segmented_prefill_equals_one_pass(pair):
    ours, ids, ref_logits, _ = pair
    ours.prefill_segment = 16
    try:
        logits, _ = ours(torch.tensor([ids]))
        last3, _ = ours(torch.tensor([ids]), logits_to_keep=3)
    finally:
        ours.prefill_segment = 2048
    assert logits.shape[1] == len(ids)
    assert rel_err(logits[0], ref_logits) < TOL
    assert rel_err(last3[0], ref_logits[-3:]) < TOL
