import torch

from modrwkv import RWKV7Config
from modrwkv.inference import prepare_for_inference
from tests.conftest import random_backbone

CFG = RWKV7Config(vocab_size=256, n_layer=2, n_embd=64, head_size=16)


def transposed(linear: torch.nn.Linear) -> bool:
    return linear.weight.stride() == (1, linear.weight.shape[0])


def test_inference_layout_keeps_the_outputs_and_training_keeps_contiguous_weights():
    model = random_backbone(CFG, seed=2)
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    expected, _ = model(ids)
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
    prepare_for_inference(model)
    assert transposed(model.head) and transposed(model.blocks[0].att.receptance)  # fp32, tall and square: [in, out]
    assert not transposed(model.blocks[0].ffn.value)  # wide (out < in): row-major stays faster
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], expected, rtol=1e-5, atol=1e-5)
    assert not model.training


def test_inference_in_bf16_keeps_row_major_weights():
    model = prepare_for_inference(random_backbone(CFG, seed=2), torch.bfloat16)
    assert model.head.weight.dtype == torch.bfloat16 and model.head.weight.is_contiguous()
