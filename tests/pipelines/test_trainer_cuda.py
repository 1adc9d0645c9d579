"""The training core's micro-step on a GPU queues its work without waiting for the device: with the batch's layout
on the host (what `to_device` leaves there), CUDA's sync debug mode raises on any call that would make the host
wait. On the CPU, tests/modrwkv/test_multimodal.py and tests/pipelines/test_trainer.py count the same reads."""

import pytest
import torch

from modrwkv.batching import Collator
from modrwkv.tokenizer import WorldTokenizer
from pipelines.train_config import PhaseConfig
from pipelines.trainer import LocalEngine, optimizer_for, to_device
from tests.modrwkv.test_multimodal import packing_samples, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("phase", [1, 2])
def test_a_multimodal_micro_step_makes_no_synchronizing_call(layout, phase):
    """Forward and backward, phase I and phase II (the backbone, its embedding included, trained)."""
    model = tiny_model(seed=0).cuda()
    model.set_phase(phase)
    optimizer = optimizer_for(model, PhaseConfig(lr=1e-3, steps=1, global_batch=2, micro_batch=1))
    engine = LocalEngine(model, optimizer, accumulation=4, grad_clip=1.0)  # no optimizer step in 2 micro-steps
    collator = Collator(WorldTokenizer(), model.config, max_length=400)

    def micro_step():
        encoded, _ = collator.encode_all(packing_samples())
        batch = to_device(collator.pack([encoded]) if layout == "packed" else collator(packing_samples()),
                          engine.device)
        loss = engine(batch.input_ids, batch.features, attention_mask=batch.attention_mask, labels=batch.labels,
                      sample_ids=batch.sample_ids, return_logits=False, cu_seqlens=batch.cu_seqlens).loss
        engine.backward(loss)
        engine.step()
        return loss

    micro_step()  # compiles the Triton kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = micro_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    assert all(p.grad is not None for p in model.projectors["image"].parameters())
