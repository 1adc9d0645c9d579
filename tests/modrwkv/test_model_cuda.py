"""The backbone on a GPU (the CUDA default backend, compiled Triton) against the same weights on the CPU (the
chunked PyTorch form): right-padded batches and packed rows, forward and backward. The kernels' own tests check
the recurrence alone; these check what the model builds around it (padding, the packed layout, the shifts)."""

import pytest
import torch

import modrwkv_kernels as kernels
from modrwkv import RWKV7Config
from tests.conftest import random_backbone

from .test_model import offsets, rel_err

pytestmark = pytest.mark.gpu
SMALL = RWKV7Config(vocab_size=97, n_layer=2, n_embd=128, head_size=32)
TOL = 1e-4  # fp32 products on the GPU run as tf32x3, the CPU's in plain fp32


@pytest.fixture
def pair(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)  # each device's default backend
    cpu = random_backbone(SMALL)
    return cpu, random_backbone(SMALL).cuda()


@torch.no_grad()
def test_right_padded_batch_on_cuda_equals_the_cpu(pair):
    cpu, gpu = pair
    g = torch.Generator().manual_seed(0)
    lengths = (70, 9, 1, 33)
    ids = torch.randint(0, 97, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    logits, state = cpu(ids, attention_mask=mask)
    gpu_logits, gpu_state = gpu(ids.cuda(), attention_mask=mask.cuda())
    for i, n in enumerate(lengths):
        assert rel_err(gpu_logits[i, :n].cpu(), logits[i, :n]) < TOL
    for field in ("att_shift", "wkv", "ffn_shift"):
        assert rel_err(getattr(gpu_state, field).cpu(), getattr(state, field)) < TOL


def test_packed_row_on_cuda_equals_the_cpu_forward_and_backward(pair):
    cpu, gpu = pair
    cpu.train(), gpu.train()
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 40, 17, 64]
    ids = torch.randint(0, 97, (1, sum(lengths)), generator=g)
    weights = torch.randn(1, sum(lengths), 97, generator=g)
    logits = {}
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        out, _ = model(ids.to(device), cu_seqlens=offsets(lengths).to(device))
        (out * weights.to(device)).sum().backward()
        logits[device] = out.detach().cpu()
    assert rel_err(logits["cuda"], logits["cpu"]) < TOL
    grads = [(name, p.grad) for name, p in cpu.named_parameters() if p.grad is not None]
    assert len(grads) > 20
    gpu_params = dict(gpu.named_parameters())
    for name, grad in grads:
        assert rel_err(gpu_params[name].grad.cpu(), grad) < TOL, name
