"""The lmms-eval wrapper on a tiny random ModRWKV and a tiny CLIP tower, with requests carrying `.args` as
lmms-eval's Instance does. lmms-eval itself is not installed here; registration is checked against a stand-in."""

import abc
import importlib
import inspect
import math
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

import pipelines.lmms_eval_model as lmms_eval_model
from modrwkv import RWKV7Config
from modrwkv.conversation import prompt_ids
from modrwkv.generation import GenerationConfig, generate
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
from modrwkv.tokenizer import WorldTokenizer
from preprocessing.encoders import build_encoder
from tests.conftest import random_backbone

BACKBONE = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)
IMAGE_POSITIONS = 8  # CLIP 32x32 / patch 8 -> 16 patches + CLS = 17 vectors; kernel 3, stride 2 -> (17-3)//2+1


@dataclass
class Request:  # what the wrapper reads of lmms-eval's Instance
    args: tuple


def rgb(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8))


DOCS = {0: {"image": rgb(0)}, 1: {"image": rgb(1)}, 2: {"image": rgb(2).convert("L")}}


def doc_to_visual(doc):
    return [doc["image"]]


def no_visual(doc):
    return []


@pytest.fixture(scope="module")
def tok():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny CLIP and a tiny ModRWKV, saved where the wrapper loads them from by path, as lmms-eval would."""
    root = tmp_path_factory.mktemp("lmms")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(root / "clip")
    config = ModRWKVConfig(backbone=BACKBONE, projectors={
        "image": ProjectorConfig(encoder_dim=32, model_dim=64, kernel=3, stride=2)})
    model = ModRWKV(config, backbone=random_backbone(BACKBONE, seed=1)).eval()
    model.save_pretrained(root / "model")
    return root, model


@pytest.fixture(scope="module")
def wrapper(saved, tok):
    root, _ = saved
    evaluator = lmms_eval_model.ModRWKVEvalModel(pretrained=str(root / "model"), encoder="clip",
                                                 encoder_dir=str(root / "clip"), device="cpu", batch_size=1, tokenizer=tok)
    evaluator.task_dict = {"vqa": {"test": DOCS}}
    return evaluator


def test_an_encoder_object_is_used_as_given_beside_an_encoder_dir(wrapper, saved, tok):
    """An encoder object with the folder of its weights was taken for an encoder kind's name: "unknown encoder"."""
    root, _ = saved
    evaluator = lmms_eval_model.ModRWKVEvalModel(pretrained=str(root / "model"), encoder=wrapper.encoder,
                                                 encoder_dir=str(root / "clip"), device="cpu", tokenizer=tok)
    assert evaluator.encoder is wrapper.encoder


def stepwise_log_prob(model, ids, features, target_ids):
    """Reference: prefill the prompt, then feed the target one token at a time (the recurrent path)."""
    logits, state = model.prefill(torch.tensor([ids]), [features])
    total, greedy = 0.0, True
    for token in target_ids:
        total += torch.log_softmax(logits[0].float(), dim=-1)[token].item()
        greedy &= int(logits[0].argmax()) == token
        logits, state = model.backbone(torch.tensor([[token]]), state=state, logits_to_keep=1)
        logits = logits[:, -1]
    return total, greedy


def test_loglikelihood_matches_the_model_on_encoded_images(wrapper, saved, tok):
    root, model = saved
    encoder = build_encoder("clip", root / "clip")
    requests = [Request(("What colour is it?", "dark red", doc_to_visual, doc_id, "vqa", "test")) for doc_id in (0, 1)]
    results = wrapper.loglikelihood(requests)
    for (score, greedy), doc_id in zip(results, (0, 1)):
        features = [("image", encoder.encode([DOCS[doc_id]["image"]])[0])]
        ids = prompt_ids(tok, "<image>\nWhat colour is it?", [IMAGE_POSITIONS])
        expected, expected_greedy = stepwise_log_prob(model, ids, features, tok.encode(" dark red"))
        assert score == pytest.approx(expected, rel=1e-4)
        assert greedy == expected_greedy
    assert results[0][0] != pytest.approx(results[1][0], rel=1e-4)  # the image changes the score


@pytest.mark.parametrize("quantize,rel", [("none", 1e-5), ("int8", 2.0**-8)])  # int8: 5.0 = 127 steps of a bf16 scale
def test_loglikelihood_greedy_flag_and_value_by_hand(tok, quantize, rel):
    """A model whose logits ignore the input: 0 everywhere except 5 for " red". Then
    log p(" red") = 5 - log(e^5 + 65535) and log p(" blue") = -log(e^5 + 65535), at every position."""
    red, blue = tok.encode(" red"), tok.encode(" blue")
    assert len(red) == len(blue) == 1
    model = ModRWKV(ModRWKVConfig(backbone=BACKBONE), backbone=random_backbone(BACKBONE))
    with torch.no_grad():
        model.backbone.ln_out.weight.zero_()
        model.backbone.ln_out.bias.zero_()
        model.backbone.ln_out.bias[0] = 1.0
        model.backbone.head.weight.zero_()
        model.backbone.head.weight[red[0], 0] = 5.0
    evaluator = lmms_eval_model.ModRWKVEvalModel(pretrained=model, device="cpu", tokenizer=tok, quantize=quantize)
    assert (quantize == "int8") == (getattr(evaluator.model.backbone.head, "mode", None) == "int8")
    evaluator.task_dict = {"qa": {"val": {7: {"answer": "blue"}}}}
    requests = [Request(("Which colour?", "red", no_visual, 7, "qa", "val")),
                Request(("Which colour?", lambda doc: doc["answer"], no_visual, 7, "qa", "val"))]
    normaliser = math.log(math.exp(5) + 65535)
    (red_score, red_greedy), (blue_score, blue_greedy) = evaluator.loglikelihood(requests)
    assert red_score == pytest.approx(5 - normaliser, rel=rel) and red_greedy
    assert blue_score == pytest.approx(-normaliser, rel=rel) and not blue_greedy


def test_generate_until_stops_at_the_stop_string(wrapper, saved, tok):
    _, model = saved
    ids, features = wrapper.request_inputs("Describe it.", [DOCS[0]["image"]], "ref")
    logits, state = model.prefill(torch.tensor([ids]), [features])
    reference = generate(model.backbone, [ids], GenerationConfig(max_new_tokens=12, temperature=0),
                         state=state, first_logits=logits)
    full = tok.decode(reference.tokens[0]).split("\n\n")[0].strip()  # the turn ends at "\n\n" in any case
    assert len(full) >= 6, "the reference continuation is too short to cut"
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.find(stop)].strip()

    def ask(until):
        return wrapper.generate_until([Request(("Describe it.", {"until": until, "max_new_tokens": 12},
                                                doc_to_visual, 0, "vqa", "test"))])[0]

    assert ask(["never appears"]) == full
    assert ask([stop, "also never"]) == expected and len(expected) < len(full)
    assert ask(stop) == expected  # lmms-eval also allows a single string


def test_images_go_through_the_encoder_once_per_request(wrapper, monkeypatch):
    seen = []
    encode = wrapper.encoder.encode

    def spy(images, sample_ids):
        seen.append((len(images), [im.shape[-1] for im in images], sample_ids))
        return encode(images, sample_ids)

    monkeypatch.setattr(wrapper.encoder, "encode", spy)
    # doc 2 is grayscale: converted to RGB for the encoder; a context naming the image keeps its own placeholder
    wrapper.generate_until([Request(("<image> What is it?", {"max_new_tokens": 2}, doc_to_visual, 2, "vqa", "test"))])
    assert seen == [(1, [3], ["vqa/test/2/0"])]
    with pytest.raises(ValueError, match="vqa/test/0: the text has 2 modality placeholders but 1"):
        wrapper.generate_until([Request(("<image><image>?", {}, doc_to_visual, 0, "vqa", "test"))])


def test_errors_name_the_request(wrapper):
    """An image the encode job would reject, and one whose features the model cannot place, name the request's
    task/split/doc_id (the model's own check named "sample 0" for every request)."""
    nan = Image.fromarray(np.full((40, 30), np.nan, dtype=np.float32))  # a float image ("F" mode)
    with pytest.raises(ValueError, match=r"vqa/test/1: .*NaN"):
        wrapper.generate_until([Request(("What?", {}, lambda doc: [nan], 1, "vqa", "test"))])
    ids, features = wrapper.request_inputs("What is it?", [rgb(0)], "vqa/test/0")
    shorter = [("image", features[0][1][:-2])]  # fewer vectors than the prompt's placeholders hold
    with pytest.raises(ValueError, match="vqa/test/0"):
        wrapper.greedy_until(ids, shorter, ["\n"], 2, "vqa/test/0")


def test_a_model_object_with_only_an_encoder_dir_is_refused(saved, tok):
    """A model object records no encoder: an encoder_dir without its kind was ignored, and every image request
    then failed with "no image encoder was given"."""
    root, model = saved
    with pytest.raises(ValueError, match="a model object records no encoder; name its kind with encoder="):
        lmms_eval_model.ModRWKVEvalModel(pretrained=model, encoder_dir=str(root / "clip"), device="cpu", tokenizer=tok)


def test_lmms_eval_finds_the_class_by_name_through_the_entry_point(monkeypatch):
    """lmms-eval 0.4 and later read plugin models from the "lmms_eval.models" entry points, each a manifest (a
    stand-in of lmms-eval's ModelManifest here): the installed package declares one naming this class."""
    from importlib.metadata import entry_points

    declared = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "modrwkv"]
    assert [ep.value for ep in declared] == ["pipelines.lmms_eval_entry:manifest"]

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None

    registry = types.ModuleType("lmms_eval.models.registry_v2")
    registry.ModelManifest = ModelManifest
    for name in ("lmms_eval", "lmms_eval.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "lmms_eval.models.registry_v2", registry)
    manifest = declared[0].load()()
    module, cls = manifest.simple_class_path.rsplit(".", 1)
    found = getattr(importlib.import_module(module), cls)
    assert manifest.model_id == "modrwkv" and found.__name__ == "ModRWKVEvalModel"
    # what lmms-eval's command line hands `create_from_arg_string` besides model_args binds (None values dropped)
    inspect.signature(found).bind(pretrained="runs/phase2", encoder_dir="encoders/siglip2", batch_size=1,
                                  max_batch_size=8, device="cuda")


def test_a_16_bit_image_reaches_the_encoder_as_the_encode_job_decodes_it(wrapper):
    """Evaluation and the cached features it is compared with read an image alike: a 16-bit scan scaled by its
    range (PIL's convert("RGB") would clip it to white)."""
    import io

    from preprocessing.validate import Limits, decode_image

    scan = Image.fromarray(np.linspace(0, 65535, 40 * 30).reshape(40, 30).astype(np.uint16))
    png = io.BytesIO()
    scan.save(png, format="PNG")
    stored = decode_image(png.getvalue(), Limits())
    assert stored.min() == 0 and stored.max() == 255
    _, features = wrapper.request_inputs("What is it?", [Image.open(io.BytesIO(png.getvalue()))], "scan")
    torch.testing.assert_close(features[0][1], wrapper.encoder.encode([stored])[0])


def test_registers_with_lmms_eval_when_installed(saved, tok):
    """With lmms-eval importable, the class subclasses its abstract `lmms` base and registers as "modrwkv"."""
    class lmms(abc.ABC):
        def __init__(self):
            self.task_dict = {}

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    registry = {}

    def register_model(*names):
        def decorate(cls):
            registry.update({name: cls for name in names})
            return cls
        return decorate

    fakes = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
             "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"),
             "lmms_eval.api.registry": types.ModuleType("lmms_eval.api.registry")}
    fakes["lmms_eval.api.model"].lmms = lmms
    fakes["lmms_eval.api.registry"].register_model = register_model
    sys.modules.update(fakes)
    try:
        module = importlib.reload(lmms_eval_model)
        assert registry == {"modrwkv": module.ModRWKVEvalModel} and issubclass(module.ModRWKVEvalModel, lmms)
        evaluator = module.ModRWKVEvalModel(pretrained=saved[1], device="cpu", tokenizer=tok)  # not abstract
        assert evaluator.task_dict == {}
    finally:
        for name in fakes:
            del sys.modules[name]
        importlib.reload(lmms_eval_model)
