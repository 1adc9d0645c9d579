"""`modrwkv.quantize`: every linear layer replaced, each within its rounding bound, a trained model's predictions
kept, and a quantized model refused by save_pretrained."""

import pytest
import torch
import torch.nn.functional as F

from modrwkv import RWKV7, RWKV7Config, quantize
from modrwkv.checkpoint import CheckpointError
from modrwkv.generation import GenerationConfig, generate
from modrwkv.inference import QuantizedLinear, prepare_for_inference
from modrwkv.tokenizer import WorldTokenizer
from pipelines.text_pretrain import bundled_text, train_on_text
from tests.conftest import random_backbone
from tests.modrwkv.test_multimodal import tiny_model

CFG = RWKV7Config(vocab_size=256, n_layer=2, n_embd=64, head_size=16)
BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: relative rounding error <= 2^-9, with a factor 2 of margin


@pytest.fixture(scope="module")
def zen():
    """The Zen of Python as ids into its own small vocabulary, and a tiny backbone trained on it (seconds)."""
    words = WorldTokenizer().encode(bundled_text())
    vocab = {t: i for i, t in enumerate(sorted(set(words)))}
    ids = [vocab[t] for t in words]
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=len(vocab), n_layer=2, n_embd=64, head_size=16)).init_weights()
    train_on_text(model, ids, steps=60, ctx_len=32, batch_size=8, lr=1e-2)
    return model, torch.tensor([ids])


@pytest.mark.parametrize("in_features,bias", [(64, False), (13, True)])  # 13: the padded-width path
def test_an_int8_layer_is_within_half_a_step_per_weight_and_bf16_rounding_of_the_product(in_features, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 40, bias=bias)
    layer = QuantizedLinear(linear, "int8")
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (40,)
    w, deq = linear.weight.detach(), layer.dequantized_weight()
    step = w.abs().amax(dim=1, keepdim=True) / 127  # symmetric, per output channel
    assert ((deq - w).abs() <= step / 2 * (1 + BF16_EPS) + 1e-7).all()
    assert (deq - w).abs().max() > 0  # really rounded
    x = torch.randn(1, in_features, 5).transpose(1, 2)  # a view, not contiguous, as after a Conv1d
    exact = x.to(torch.bfloat16).float() @ deq.t() + (linear.bias.detach() if bias else 0)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (1, 5, 40)
    # the kernel returns bf16: each output within bf16 rounding of the magnitude it sums over
    tolerance = BF16_EPS * (x.to(torch.bfloat16).float().abs() @ deq.abs().t()) + 1e-6
    assert ((y - exact).abs() <= tolerance).all()


def test_quantize_replaces_every_linear_of_a_backbone_and_of_a_modrwkv():
    for model in (random_backbone(CFG), tiny_model(forecast_horizon=4, forecast_lookback=6)):
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        assert "head" in names or "backbone.head" in names
        model.train()
        assert quantize(model, "int8") is model and not model.training
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)] == names


def test_bf16_keeps_bf16_weights_and_fp32_activations_elsewhere():
    model = random_backbone(CFG, seed=1)
    ids = torch.randint(0, CFG.vocab_size, (2, 7))
    with torch.no_grad():
        expected, _ = model(ids)
        logits, state = quantize(model, "bf16")(ids)
    assert model.head.weight.dtype == torch.bfloat16 and model.ln_out.weight.dtype == torch.float32
    assert logits.dtype == torch.float32 and state.att_shift.dtype == torch.float32
    assert ((logits - expected).norm() / expected.norm()) < 0.02


def test_int8_keeps_a_trained_models_predictions_and_perplexity(zen):
    """Per weight the rounding is at most half a step, max|row| / 254: uniform errors of ~0.9% of a Gaussian
    row's RMS, which average out over a dot product; the bf16 activations add ~0.2%. On a trained model
    (confident, well-separated logits) that keeps top-1 and perplexity; measured: logits 0.7% off, top-1 100%."""
    model, ids = zen
    quantized = prepare_for_inference(RWKV7(model.config), quantization="none")
    quantized.load_state_dict(model.state_dict())
    quantize(quantized, "int8")
    with torch.no_grad():
        expected, reference = model(ids)[0][0], quantized(ids)[0][0]
    nll = [F.cross_entropy(logits[:-1], ids[0, 1:]).item() for logits in (expected, reference)]
    assert nll[0] < 2.0  # the model did learn the text (a uniform guess is ln(vocab) ~ 4.9)
    assert (expected.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.99
    assert abs(torch.tensor(nll[1] - nll[0]).exp() - 1) < 0.01  # perplexity within 1%
    assert ((reference - expected).norm() / expected.norm()) < 0.02


def test_a_quantized_modrwkv_prefills_features_and_generates():
    model = tiny_model(seed=3)
    ids = torch.tensor([[1, 2] + [65530] * 3 + [5]])
    features = [[("image", torch.randn(7, 24))]]
    reference_logits, _ = model.prefill(ids, features)
    quantize(model, "int8")
    logits, state = model.prefill(ids, features)
    assert ((logits - reference_logits).norm() / reference_logits.norm()) < 0.05
    out = generate(model.backbone, [ids[0].tolist()], GenerationConfig(max_new_tokens=3, temperature=0),
                   state=state, first_logits=logits)
    assert len(out.tokens[0]) <= 3


def test_save_pretrained_refuses_a_quantized_model_and_writes_nothing(tmp_path):
    backbone, multimodal = random_backbone(CFG), tiny_model()
    for model in (quantize(backbone, "int8"), quantize(multimodal, "bf16")):
        with pytest.raises(CheckpointError, match="quantized for inference"):
            model.save_pretrained(tmp_path / "out")
    with pytest.raises(CheckpointError, match="quantized"):
        multimodal.save_pretrained(tmp_path / "out", adapter_only=True)
    assert not (tmp_path / "out").exists()


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="int4"):
        quantize(random_backbone(CFG), "int4")
