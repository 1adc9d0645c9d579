"""The optional "fla" backend (flash-linear-attention's chunk_rwkv7) behind our contract: same inputs, state
layout (value x key), initial and final states, packed rows. It runs only on a GPU with fla installed; on CPU
the backend's error names the extra to install."""

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
