"""An adapter-only model opens in fp32 however its backbone reaches it: recorded by a local path or by an s3:// URI,
or given (`--backbone`), even a backbone saved in bf16, and so does the served model; the adapter is what training
saved, bit for bit."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from modrwkv import RWKV7, RWKV7Config
from modrwkv.checkpoint import CheckpointError
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
from pipelines.logged_models import MODEL_ARTIFACT
from pipelines.serving import ModRWKVService
from pipelines.trained_model import load_trained_model
from preprocessing import local_copy, storage
from tests.conftest import random_backbone
from tests.services import BUCKET


def test_an_adapter_only_model_opens_in_fp32_from_a_bf16_backbone(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(local_copy.ROOT_ENV, str(tmp_path / "copies"))
    random_backbone(RWKV7Config(vocab_size=256, n_layer=1, n_embd=32, head_size=16)).to(
        torch.bfloat16).save_pretrained(tmp_path / "bf16")
    remote = f"s3://{BUCKET}/trained-model/bf16"
    storage.copy_tree(str(tmp_path / "bf16"), remote)
    backbone = RWKV7.from_pretrained(tmp_path / "bf16", dtype=torch.float32)  # as training builds it
    torch.manual_seed(0)
    model = ModRWKV(ModRWKVConfig(backbone.config, {"image": ProjectorConfig(encoder_dim=8, adapter_scale=2)}),
                    backbone=backbone)
    for name, path in (("local", str(tmp_path / "bf16")), ("remote", remote)):
        model.save_pretrained(tmp_path / name, adapter_only=True, backbone_source={"path": path})
    saved = load_file(tmp_path / "local" / "adapter.safetensors")
    assert all(v.dtype == torch.float32 for v in saved.values())

    for opened in (load_trained_model(str(tmp_path / "local")), load_trained_model(str(tmp_path / "remote")),
                   load_trained_model(str(tmp_path / "local"), backbone_path=remote)):
        weights = opened.state_dict()
        assert {str(v.dtype) for v in weights.values()} == {"torch.float32"}
        assert all(torch.equal(weights[k], v) for k, v in saved.items())
    # served as a logged model, it fetches its backbone as chat does; the model class alone says what to do
    service = ModRWKVService()
    service.load_context(SimpleNamespace(artifacts={MODEL_ARTIFACT: str(tmp_path / "remote")}))
    assert torch.equal(service.model.backbone.emb.weight, backbone.emb.weight)
    with pytest.raises(CheckpointError, match=f"its backbone is recorded at {remote}, not a local path: pass "
                                              "backbone="):
        ModRWKV.from_pretrained(tmp_path / "remote")


def test_a_backbone_given_beside_a_full_model_folder_is_refused(tmp_path):
    """A full save (phase II's) holds its backbone: `--backbone` beside it was loaded, then ignored without a word."""
    config = RWKV7Config(vocab_size=256, n_layer=1, n_embd=32, head_size=16)
    random_backbone(config).save_pretrained(tmp_path / "backbone")
    model = ModRWKV(ModRWKVConfig(config, {"image": ProjectorConfig(encoder_dim=8, adapter_scale=2)}),
                    backbone=random_backbone(config))
    model.save_pretrained(tmp_path / "full")
    assert isinstance(load_trained_model(str(tmp_path / "full")), ModRWKV)
    with pytest.raises(ValueError, match="full model folder .* holds its own backbone: a backbone given beside it "
                                         r"\(--backbone\) is for an adapter-only folder"):
        load_trained_model(str(tmp_path / "full"), backbone_path=str(tmp_path / "backbone"))
