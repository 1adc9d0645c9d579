"""Triton wkv7 kernels under TRITON_INTERPRET=1 (set in conftest) against the fp64 reference: fp32 inputs,
T below, at and across chunk boundaries, with and without an initial state, H >= 2, every gradient."""

import pytest
import torch

from kernels import wkv7
from kernels.wkv7.triton_kernel import CHUNK
from tests.kernels.test_wkv7 import rel_err, wkv_inputs

TOL = 1e-5


def loss_of(y, s, seed=0):
    """A loss that weighs every output element differently, so every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    weights = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)  # noqa: E731
    return (y * weights(y)).sum() + (s * weights(s)).sum()


@pytest.mark.parametrize("T", [1, CHUNK - 3, CHUNK, 2 * CHUNK + 5])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_and_gradients_match_fp64_reference(T, with_state):
    B, H, N = 1, 2, 16
    xs64, s64 = wkv_inputs(B, T, H, N, seed=T, requires_grad=True)
    xs32 = [x.detach().float().requires_grad_() for x in xs64]
    s32 = s64.detach().float().requires_grad_()
    init64, init32 = (s64, s32) if with_state else (None, None)

    y_ref, s_ref = wkv7(*xs64, initial_state=init64, backend="reference")
    y, s = wkv7(*xs32, initial_state=init32, backend="triton")
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL
    assert rel_err(s, s_ref) < TOL

    loss_of(y_ref, s_ref).backward()
    loss_of(y, s).backward()
    names = ["r", "w", "k", "v", "a", "b"]
    for name, x32, x64 in zip(names, xs32, xs64):
        assert rel_err(x32.grad, x64.grad) < TOL, name
    if with_state:
        assert rel_err(s32.grad, s64.grad) < TOL


def test_head_size_not_a_power_of_two_and_only_final_state_used():
    xs64, s64 = wkv_inputs(2, 9, 2, 12, seed=3, requires_grad=True)
    xs32 = [x.detach().float().requires_grad_() for x in xs64]
    _, s_ref = wkv7(*xs64, initial_state=s64, backend="reference")
    _, s = wkv7(*xs32, initial_state=s64.detach().float(), backend="triton")
    assert rel_err(s, s_ref) < TOL
    s_ref.square().sum().backward()
    s.square().sum().backward()
    assert xs64[0].grad is None and torch.all(xs32[0].grad == 0)  # r does not reach the state
    for x32, x64 in zip(xs32[1:], xs64[1:]):
        assert rel_err(x32.grad, x64.grad) < TOL


def test_bf16_inputs_are_read_as_fp32():
    xs, _ = wkv_inputs(1, 7, 2, 16, seed=4)
    bf = [x.bfloat16() for x in xs]
    y_ref, s_ref = wkv7(*(x.double() for x in bf), backend="reference")  # same rounded inputs, fp64 maths
    y, s = wkv7(*bf, backend="triton")
    assert y.dtype == torch.bfloat16
    assert rel_err(s, s_ref) < TOL
    assert rel_err(y, y_ref) < 1e-2  # y itself is rounded to bf16


def test_backbone_gradients_through_triton_match_chunked(monkeypatch):
    from modrwkv import RWKV7Config
    from tests.conftest import random_backbone

    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    grads = {}
    for backend in ("chunked", "triton"):
        monkeypatch.setenv("MODRWKV_WKV7_BACKEND", backend)
        model = random_backbone(RWKV7Config(vocab_size=97, n_layer=2, n_embd=64, head_size=16)).train()
        logits, _ = model(ids)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 97), target.reshape(-1)).backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads["chunked"].items():
        assert rel_err(grads["triton"][name], g) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_fp64(dtype):
    xs, s0 = wkv_inputs(2, 1000, 4, 64, seed=9)
    y_ref, s_ref = wkv7(*xs, initial_state=s0, backend="reference")
    cuda = [x.to("cuda", dtype).requires_grad_() for x in xs]
    y, s = wkv7(*cuda, initial_state=s0.cuda().float(), backend="triton")
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel_err(y.cpu(), y_ref) < tol and rel_err(s.cpu(), s_ref) < tol
    (y.float().sum() + s.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in cuda)
