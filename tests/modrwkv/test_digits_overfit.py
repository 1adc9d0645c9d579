"""A tiny ModRWKV overfits 32 real handwritten digits (sklearn's bundled set) in phase I then phase II."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from transformers import CLIPVisionConfig, CLIPVisionModel

from modrwkv import RWKV7Config
from modrwkv.conversation import Turn, prompt_ids, tokenize_conversation
from modrwkv.generation import GenerationConfig, generate
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
from modrwkv.tokenizer import WorldTokenizer
from preprocessing.encoders import build_encoder
from tests.conftest import random_backbone

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION = "<image>\nWhat digit is this?"


def digit_images(n):
    digits = load_digits()
    images = [Image.fromarray((255 - d * 15).astype(np.uint8)).resize((32, 32), Image.NEAREST).convert("RGB")
              for d in digits.images[:n]]
    return images, [WORDS[t] for t in digits.target[:n]]


def accuracy(model, tok, feats, answers, n_tokens):
    stop = tok.encode("\n\n")
    correct = 0
    for f, answer in zip(feats, answers):
        ids = torch.tensor([prompt_ids(tok, QUESTION, [n_tokens])])
        first, state = model.prefill(ids, [[("image", f)]])
        out = generate(model.backbone, [ids[0].tolist()], GenerationConfig(max_new_tokens=4, temperature=0, stop_tokens=tuple(stop)),
                       state=state, first_logits=first)
        correct += tok.decode(out.tokens[0]).strip() == answer
    return correct / len(answers)


def train(model, batch, steps, lr):
    groups = [{"params": list(model.trainable_parameters().values())}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    ids, labels, feats = batch
    for _ in range(steps):
        out = model(ids, feats, labels=labels, return_logits=False)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return out.loss.item()


@pytest.mark.slow
def test_overfits_32_digits_phase1_then_phase2(tmp_path):
    torch.manual_seed(0)
    tok = WorldTokenizer()
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "clip")
    encoder = build_encoder("clip", tmp_path / "clip")
    images, answers = digit_images(32)
    feats = encoder.encode(images)
    backbone_cfg = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)
    config = ModRWKVConfig(backbone=backbone_cfg, projectors={
        "image": ProjectorConfig(encoder_dim=48, model_dim=64, kernel=3, stride=2, adapter_scale=2)})
    # a backbone whose output projections are not zero (the official init's are): phase I's gradient reaches
    # the adapter only through a backbone that already mixes tokens, as a pretrained one does
    model = ModRWKV(config, backbone=random_backbone(backbone_cfg).train())
    n = config.projectors["image"].compressed_length(feats[0].shape[0])
    pairs = [tokenize_conversation(tok, [Turn("user", QUESTION), Turn("assistant", a)], [n], f"digit-{i}")
             for i, a in enumerate(answers)]
    assert len({len(p[0]) for p in pairs}) == 1  # every answer word is one token here: no padding needed
    batch = (torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]), [[("image", f)] for f in feats])

    model.set_phase(1)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    loss0 = train(model, batch, steps=1, lr=0.0)
    loss1 = train(model, batch, steps=60, lr=3e-3)
    assert loss1 < loss0
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())

    model.set_phase(2)
    loss2 = train(model, batch, steps=120, lr=3e-3)
    assert loss2 < loss1
    assert accuracy(model.eval(), tok, feats, answers, n) >= 0.9
