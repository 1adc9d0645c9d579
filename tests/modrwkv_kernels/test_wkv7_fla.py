"""The optional "fla" backend (flash-linear-attention's chunk_rwkv7) behind our contract: same inputs, state
layout (value x key), initial and final states, packed rows. fla's kernel runs only on a GPU with fla installed; on
CPU the backend's error names the extra to install, and our side of it is checked against a stand-in of fla's
contract."""

import importlib.util

import pytest
import torch

from modrwkv_kernels import packed_layout, wkv7
from tests.modrwkv_kernels.test_wkv7 import rel_err, wkv_inputs

HAS_FLA = importlib.util.find_spec("fla") is not None


@pytest.mark.skipif(HAS_FLA, reason="flash-linear-attention is installed here")
def test_fla_backend_without_the_package_names_the_extra():
    xs, _ = wkv_inputs(1, 4, 2, 16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"pip install 'modrwkv\[fla\]'"):
        wkv7(*xs, backend="fla")


def fla_stand_in(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens=None, cu_seqlens_cpu=None):
    """fla's `chunk_rwkv7` as its documentation has it, computed by our reference: w is the log-decay (the decay is
    exp(w)), states are key x value, a packed row's segments are given by cu_seqlens (and its host copy)."""
    from modrwkv_kernels import wkv7_reference

    assert scale == 1.0 and output_final_state and bool((w < 0).all())  # a log-decay: our w would not be
    ours = torch.log(-w)  # our w: the decay is exp(-exp(w))
    state = None if initial_state is None else initial_state.transpose(-1, -2)
    if cu_seqlens is None:
        y, final = wkv7_reference(r, ours, k, v, a, b, state)
        return y, final.transpose(-1, -2)
    assert cu_seqlens_cpu.device.type == "cpu" and torch.equal(cu_seqlens.cpu(), cu_seqlens_cpu)
    ys, finals = [], []
    for i, (start, end) in enumerate(zip(cu_seqlens_cpu[:-1].tolist(), cu_seqlens_cpu[1:].tolist())):
        part = [x[:, start:end] for x in (r, ours, k, v, a, b)]
        y, final = wkv7_reference(*part, None if state is None else state[i : i + 1])
        ys.append(y)
        finals.append(final.transpose(-1, -2))
    return torch.cat(ys, 1), torch.cat(finals)


@pytest.mark.parametrize("packed", [False, True])
def test_the_fla_backend_hands_fla_its_conventions(packed, monkeypatch):
    """Our side of the fla backend on CPU (its kernel needs a GPU): the log-decay, the state transposed both ways
    and the packed row's offsets reach a stand-in that computes fla's documented contract with our reference; the
    outputs, states and gradients are the reference's."""
    import sys
    import types

    fla = types.ModuleType("fla")
    fla.ops = types.ModuleType("fla.ops")
    fla.ops.rwkv7 = types.SimpleNamespace(chunk_rwkv7=fla_stand_in)
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.ops", fla.ops)
    monkeypatch.setitem(sys.modules, "fla.ops.rwkv7", fla.ops.rwkv7)
    lengths = (1, 16, 17, 5)
    if packed:
        xs, _ = wkv_inputs(1, sum(lengths), 2, 8, seed=3, dtype=torch.float64)
        s0 = wkv_inputs(len(lengths), 1, 2, 8, seed=4, dtype=torch.float64)[1]
        cu_seqlens = packed_layout(torch.tensor([0, *lengths]).cumsum(0), sum(lengths))
    else:
        xs, s0 = wkv_inputs(2, 21, 2, 8, seed=3, dtype=torch.float64)
        cu_seqlens = None
    ref, fla_run = run("reference", xs, s0, cu_seqlens), run("fla", xs, s0, cu_seqlens)
    # 1e-6: the adapter takes the log-decay in fp32 (fla computes in it at most); a state left untransposed, or the
    # decay's sign or segments wrong, is off by its whole size
    assert rel_err(fla_run[0], ref[0]) < 1e-6 and rel_err(fla_run[1], ref[1]) < 1e-6
    for name, g, g_ref in zip(["r", "w", "k", "v", "a", "b", "s0"], fla_run[2], ref[2]):
        assert rel_err(g, g_ref) < 1e-6, name


def weighted_loss(y, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sum((t.float() * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in (y, s))


def run(backend, xs, s0, cu_seqlens=None):
    leaves = [x.detach().clone().requires_grad_() for x in (*xs, s0)]
    y, s = wkv7(*leaves[:6], initial_state=leaves[6], backend=backend, cu_seqlens=cu_seqlens)
    weighted_loss(y, s).backward()
    return y.detach(), s.detach(), [x.grad for x in leaves]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_FLA, reason="needs a GPU and flash-linear-attention")
@pytest.mark.parametrize("packed", [False, True])
def test_fla_backend_matches_ours_and_fp64(packed):
    """fp32 inputs with an initial state, a batch or a packed row (segments of 1, 16, 17 and 40 steps): fla's
    outputs, final states and every gradient against the fp64 chunked form, and against our chunked kernel."""
    lengths = (1, 16, 17, 40)
    if packed:
        xs, _ = wkv_inputs(1, sum(lengths), 4, 64, seed=3)
        s0 = wkv_inputs(len(lengths), 1, 4, 64, seed=4)[1]
        cu_seqlens = packed_layout(torch.tensor([0, *lengths]).cumsum(0).cuda(), sum(lengths))
    else:
        xs, s0 = wkv_inputs(2, 300, 4, 64, seed=3)
        cu_seqlens = None
    cuda = [x.cuda().float() for x in xs]
    ref = run("chunked", [x.double() for x in cuda], s0.cuda().double(), cu_seqlens)
    ours = run("triton_chunked", cuda, s0.cuda().float(), cu_seqlens)
    fla = run("fla", cuda, s0.cuda().float(), cu_seqlens)
    for got, tol in ((ours, 1e-4), (fla, 1e-2)):
        assert rel_err(got[0], ref[0]) < tol and rel_err(got[1], ref[1]) < tol
        for name, g, g_ref in zip(["r", "w", "k", "v", "a", "b", "s0"], got[2], ref[2]):
            assert rel_err(g, g_ref) < 10 * tol, name
