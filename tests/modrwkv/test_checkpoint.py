import json

import pytest
import torch
from safetensors.torch import load_file

from modrwkv import RWKV7, RWKV7Config
from modrwkv.checkpoint import CheckpointError
from modrwkv.fla_layout import convert_fla_to_rwkv_pth, convert_rwkv_pth_to_fla
from tests.conftest import random_backbone

CFG = RWKV7Config(vocab_size=211, n_layer=3, n_embd=64, head_size=16, dim_ffn=160)


@pytest.fixture
def pth(tmp_path):
    path = tmp_path / "rwkv.pth"
    torch.save(random_backbone(CFG).state_dict(), path)
    return path


def test_pth_shapes_are_inferred(pth):
    model = RWKV7.from_pretrained(pth)
    assert model.config == CFG


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_from_pretrained_round_trip(tmp_path, pth, dtype):
    model = RWKV7.from_pretrained(pth, dtype=dtype)
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_embd"] == 64
    again = RWKV7.from_pretrained(tmp_path / "hf")
    assert again.emb.weight.dtype == dtype
    ids = torch.randint(0, 211, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], again(ids)[0])


def test_fla_conversion_round_trip(tmp_path, pth):
    # fla's ln_x eps is head_dim x norm_eps, RWKV-7's 64e-5: equal at head size 64 only, and said at others
    with pytest.warns(UserWarning, match="head size 16: fla computes ln_x with eps 0.00016, this backbone was trained "
                                         "with 64e-5"):
        convert_rwkv_pth_to_fla(pth, tmp_path / "fla")
    fla = load_file(tmp_path / "fla" / "model.safetensors")
    original = torch.load(pth, weights_only=True)
    # names and layouts of flash-linear-attention's HF model
    assert "lm_head.weight" in fla and "model.embeddings.weight" in fla
    assert torch.equal(fla["model.layers.1.attn.w_lora.lora.0.weight"], original["blocks.1.att.w1"].t())
    assert torch.equal(fla["model.layers.1.attn.w_lora.lora.2.bias"], original["blocks.1.att.w0"].view(-1))
    assert torch.equal(fla["model.layers.2.attn.r_proj.weight"], original["blocks.2.att.receptance.weight"])
    assert fla["model.layers.0.attn.x_r"].shape == (1, 1, 64) and fla["model.layers.0.ffn.x_k"].shape == (64,)
    assert "model.layers.0.pre_norm.weight" in fla and not any(k.startswith("model.layers.0.attn.v_lora") for k in fla)
    hf = json.loads((tmp_path / "fla" / "config.json").read_text())
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["intermediate_size"]) == (64, 3, 160)

    convert_fla_to_rwkv_pth(tmp_path / "fla", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(original)  # layer 0's unused value LoRA too, which RWKV-LM's strict load wants
    for name, tensor in back.items():
        unused = name in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
        assert tensor.shape == original[name].shape and (not tensor.any() if unused else torch.equal(
            tensor, original[name])), name
    ids = torch.randint(0, 211, (1, 9))
    with torch.no_grad():
        assert torch.equal(RWKV7.from_pretrained(pth)(ids)[0], RWKV7.from_pretrained(tmp_path / "back.pth")(ids)[0])


def test_corrupt_checkpoint_names_the_file(tmp_path, pth):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable PyTorch weights file"):
        RWKV7.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="missing.pth: no such checkpoint file"):
        RWKV7.from_pretrained(tmp_path / "missing.pth")


def test_wrong_architecture_lists_every_problem(tmp_path, pth):
    weights = torch.load(pth, weights_only=True)
    del weights["blocks.1.att.k_k"], weights["blocks.2.ffn.x_k"]
    weights["blocks.1.att.time_faaaa"] = torch.zeros(4, 16)  # an RWKV-6 key
    weights["blocks.2.att.r_k"] = torch.zeros(2, 32)
    path = tmp_path / "wrong.pth"
    torch.save(weights, path)
    with pytest.raises(CheckpointError) as info:
        RWKV7.from_pretrained(path)
    message = str(info.value)
    assert "wrong.pth" in message
    for fragment in ("blocks.1.att.k_k", "blocks.2.ffn.x_k", "unexpected keys (1): blocks.1.att.time_faaaa",
                     "blocks.2.att.r_k: checkpoint (2, 32) vs model (4, 16)"):
        assert fragment in message


def test_not_rwkv7_at_all(tmp_path):
    path = tmp_path / "gpt.pth"
    torch.save({"transformer.wte.weight": torch.zeros(10, 4)}, path)
    with pytest.raises(CheckpointError, match="gpt.pth: not an RWKV-7 .* missing keys: emb.weight"):
        RWKV7.from_pretrained(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "note": object()}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        RWKV7.from_pretrained(path)


def test_from_pretrained_needs_its_files(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        RWKV7.from_pretrained(tmp_path)


def test_a_folder_missing_the_embedding_or_with_a_damaged_record_names_the_file(tmp_path, pth):
    """A saved folder without emb.weight raised a bare KeyError before the strict load could list what is missing;
    a damaged record beside a model's weights a JSONDecodeError naming no file."""
    from safetensors.torch import save_file

    from modrwkv.model_folder import BACKBONE_SOURCE_FILE, ENCODERS_FILE, read_backbone_source, read_encoders_record

    RWKV7.from_pretrained(pth).save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    del weights["emb.weight"]
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors.* missing keys .*emb\.weight"):
        RWKV7.from_pretrained(tmp_path / "hf")
    for name, read in ((BACKBONE_SOURCE_FILE, read_backbone_source), (ENCODERS_FILE, read_encoders_record)):
        (tmp_path / name).write_text('{"path": ')
        with pytest.raises(CheckpointError, match=f"{name}: not JSON"):
            read(tmp_path)


def test_a_save_cut_short_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """safetensors wrote straight onto model.safetensors: a save cut short (Ctrl-C, a full disk) left a truncated file
    that the next start (the demo's backbone) took for a saved model."""
    import modrwkv.checkpoint as checkpoint

    model = random_backbone(RWKV7Config(vocab_size=256, n_layer=1, n_embd=32, head_size=16))
    model.save_pretrained(tmp_path / "saved")
    before = (tmp_path / "saved" / "model.safetensors").read_bytes()
    real = checkpoint.save_file

    def cut_short(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", cut_short)
    with pytest.raises(KeyboardInterrupt):
        random_backbone(model.config, seed=1).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new" / "model.safetensors").exists()
