"""`modrwkv export`: the transformers folder loads through AutoModelForCausalLM / AutoTokenizer with
trust_remote_code in an interpreter where no package of ours can be imported, and gives our logits, forecast,
token ids and greedy tokens; the fla export gives the backbone's weights back; bad folders are clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modrwkv import RWKV7Config
from modrwkv.checkpoint import UNUSED_LAYER0
from modrwkv.conversation import PLACEHOLDER_IDS, TURN_SPECIALS, prompt_ids
from modrwkv.fla_layout import convert_fla_to_rwkv_pth
from modrwkv.hf_export.exporter import export_fla, export_hf
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
from modrwkv.tokenizer import END_OF_TEXT, WorldTokenizer
from modrwkv.wavenet import WaveNetConfig
from pipelines.cli import main
from tests.conftest import random_backbone

BACKBONE = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)
IMAGE_QUESTION = "<image>\nWhat digit is this?"
SERIES_QUESTION = "<series>\nWhat comes next?"
TOKENIZER_TEXTS = ["Hello, world!", "User: <image>\nWhat digit is this?\n\nAssistant:", "日本語 é\n\n<|endoftext|>"]
GREEDY_TOKENS = 4
# What the export runs in a fresh interpreter (-I: no PYTHONPATH, no script folder on sys.path): a finder first on
# sys.meta_path refuses our packages, which the editable install would otherwise still find; it proves that first.
LOAD_EXPORT = r"""
import importlib.abc, json, sys
OURS = ("modrwkv", "modrwkv_kernels", "preprocessing", "pipelines", "infra")

class RefuseOurs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OURS:
            raise ModuleNotFoundError(f"{name} is not importable here")

sys.meta_path.insert(0, RefuseOurs())
try:
    import modrwkv
    sys.exit("modrwkv is importable: the check would prove nothing")
except ModuleNotFoundError:
    pass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

export_dir, inputs_file, outputs_file = sys.argv[1:]
inputs = torch.load(inputs_file, weights_only=True)
model, loading = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, output_loading_info=True)
tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
image, series = inputs["image"], inputs["series"]
with torch.no_grad():
    text_ids = tokenizer(inputs["text_prompt"], return_tensors="pt").input_ids
    image_ids = model.expand_placeholders(tokenizer(inputs["image_prompt"], return_tensors="pt").input_ids,
                                          image_features=[image])
    series_ids = model.expand_placeholders(tokenizer(inputs["series_prompt"], return_tensors="pt").input_ids,
                                           series_features=[series])
    generated = model.generate(image_ids, image_features=[image], max_new_tokens=inputs["greedy_tokens"],
                               do_sample=False)
    # a reply steered token by token: it ends its turn across two tokens ("。\n", "\n"), then would go on
    forced, start = inputs["forced"].tolist(), image_ids.shape[1]
    steered = model.generate(image_ids, image_features=[image], max_new_tokens=len(forced), do_sample=False,
                             prefix_allowed_tokens_fn=lambda row, ids: [forced[len(ids) - start]])
    outputs = {
        "text_ids": text_ids, "image_ids": image_ids, "series_ids": series_ids,
        "text_logits": model(text_ids).logits,
        "image_logits": model(image_ids, image_features=[image]).logits,
        "forecast": model(series_ids, series_features=series, series_lookback=inputs["lookback"]).forecast,
        "greedy": generated[:, image_ids.shape[1]:],
        "steered": steered[0, start:],
        # a batch of the prompt twice, an item each; two sequences of one prompt (top_k=1: each the greedy one)
        "batch_ids": model.expand_placeholders(tokenizer([inputs["image_prompt"]] * 2, return_tensors="pt").input_ids,
                                               image_features=[image, image]),
        "sampled_twice": model.generate(image_ids, image_features=[image], max_new_tokens=inputs["greedy_tokens"],
                                        do_sample=True, top_k=1, num_return_sequences=2)[:, start:],
        "tokenized": [torch.tensor(tokenizer.encode(text)) for text in inputs["tokenizer_texts"]],
    }
decoded = [tokenizer.decode(ids) for ids in outputs["tokenized"]]
problems = {name: keys for name, keys in loading.items() if keys}
half = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.bfloat16)
cast = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).to(torch.bfloat16)
dtypes, cast_dtypes = ({name: str(t.dtype) for name, t in [*m.named_buffers(), ("emb", m.backbone.emb.weight)]}
                       for m in (half, cast))
ours_loaded = sorted(m for m in sys.modules if m.split(".")[0] in OURS)
torch.save(outputs, outputs_file)
print(json.dumps({"loading_problems": str(problems), "ours_loaded": ours_loaded, "decoded": decoded,
                  "bf16_dtypes": dtypes, "cast_dtypes": cast_dtypes}))
"""


def tiny_model() -> ModRWKV:
    """Every part the export carries: a whitened image projector with compression, a series projector behind a
    WaveNet, a forecast head and skip; the zero-initialised forecast parts made random so they count."""
    config = ModRWKVConfig(
        backbone=BACKBONE,
        projectors={"image": ProjectorConfig(encoder_dim=24, kernel=3, stride=2, adapter_scale=2),
                    "series": ProjectorConfig(encoder_dim=16)},
        forecast_horizon=4, forecast_lookback=8, series_encoder=WaveNetConfig(hidden=16, layers=3))
    model = ModRWKV(config, backbone=random_backbone(BACKBONE))
    torch.manual_seed(1)
    model.projectors["image"].set_feature_stats(torch.randn(24), whitening=torch.randn(24, 24) * 0.3)
    with torch.no_grad():
        for head in (model.forecast_head, model.forecast_skip):
            head.weight.normal_(0, 0.3)
            head.bias.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Our model, its folder, and the export made through the CLI."""
    root = tmp_path_factory.mktemp("hf_export")
    model = tiny_model()
    model.save_pretrained(root / "model")
    assert main(["export", "--to", "hf", str(root / "model"), str(root / "export")]) == 0
    return model, root


def our_outputs(model: ModRWKV, inputs: dict) -> dict:
    tokenizer = WorldTokenizer()
    image, series = inputs["image"], inputs["series"]
    compressed = model.projectors["image"].config.compressed_length(len(image))
    text_ids = torch.tensor([tokenizer.encode(inputs["text_prompt"])])
    image_ids = torch.tensor([prompt_ids(tokenizer, IMAGE_QUESTION, [compressed])])
    series_ids = torch.tensor([prompt_ids(tokenizer, SERIES_QUESTION, [len(series)])])
    with torch.no_grad():
        logits, state = model.prefill(image_ids, [[("image", image)]])
        greedy = []
        for _ in range(inputs["greedy_tokens"]):
            greedy.append(int(logits.argmax(dim=-1)))
            if greedy[-1] in (END_OF_TEXT, *tokenizer.encode("\n\n")):  # generate() stops after these, as chat
                break
            step, state = model.backbone(torch.tensor([greedy[-1:]]), state=state, logits_to_keep=1)
            logits = step[:, -1]
        return {
            "text_ids": text_ids, "image_ids": image_ids, "series_ids": series_ids,
            "text_logits": model(text_ids, [[]]).logits,
            "image_logits": model(image_ids, [[("image", image)]]).logits,
            "forecast": model(series_ids, [[("series", series)]], series_lookback=inputs["lookback"]).forecast,
            "greedy": torch.tensor([greedy]),
            # as training reads a turn: a written "<|endoftext|>" is text
            "tokenized": [torch.tensor(tokenizer.encode(text, allow_special=TURN_SPECIALS))
                          for text in TOKENIZER_TEXTS],
        }


def test_transformers_loads_the_export_without_our_packages_and_gives_our_outputs(exported, tmp_path):
    model, root = exported
    torch.manual_seed(2)
    inputs = {"text_prompt": "User: Tell me a story.\n\nAssistant:", "image": torch.randn(11, 24),
              "image_prompt": f"User: {IMAGE_QUESTION}\n\nAssistant:", "series": torch.randn(12, 1),
              "series_prompt": f"User: {SERIES_QUESTION}\n\nAssistant:", "lookback": torch.randn(1, 12),
              "greedy_tokens": GREEDY_TOKENS, "tokenizer_texts": TOKENIZER_TEXTS,
              "forced": torch.tensor(WorldTokenizer().encode(" 这是猫。\n\nUser: and then"))}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_EXPORT, str(root / "export"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # loaded in bf16, or cast to it after, the feature statistics stay fp32 (the normalisation computes in fp32)
    bf16_dtypes = {"projectors.image.feature_mean": "torch.float32",
                   "projectors.image.feature_whitening": "torch.float32", "emb": "torch.bfloat16"}
    assert report == {"loading_problems": "{}", "ours_loaded": [], "decoded": TOKENIZER_TEXTS,
                      "bf16_dtypes": bf16_dtypes, "cast_dtypes": bf16_dtypes}

    theirs, ours = torch.load(tmp_path / "outputs.pt", weights_only=True), our_outputs(model, inputs)
    for name in ("text_ids", "image_ids", "series_ids", "greedy"):
        assert torch.equal(theirs[name], ours[name]), name
    assert all(torch.equal(a, b) for a, b in zip(theirs["tokenized"], ours["tokenized"], strict=True))
    assert (theirs["image_ids"] == PLACEHOLDER_IDS["image"]).sum() == 5  # 11 features, kernel 3, stride 2
    turn = WorldTokenizer().encode(" 这是猫。\n\n")
    assert not set(turn) & set(WorldTokenizer().encode("\n\n"))  # the turn end split: "。\n", "\n"
    assert theirs["steered"].tolist() == turn  # stopped there, not at the end of the steered tokens
    assert torch.equal(theirs["batch_ids"], ours["image_ids"].repeat(2, 1))  # the second row was dropped
    assert torch.equal(theirs["sampled_twice"], ours["greedy"].repeat(2, 1))  # the items were not repeated
    for name in ("text_logits", "image_logits", "forecast"):
        difference = (theirs[name] - ours[name]).abs().max().item()
        print(f"{name}: max abs difference {difference:.2e} (values up to {ours[name].abs().max():.1f})")
        assert difference <= 1e-5, name


def test_the_export_holds_config_tokenizer_code_and_every_fp32_weight(exported):
    model, root = exported
    export = root / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_modrwkv.ModRWKVForCausalLM"
    assert config["backbone"] == BACKBONE.to_dict() and config["forecast_horizon"] == 4
    assert config["projectors"]["image"]["normalize"] == "whiten" and config["placeholder_ids"] == PLACEHOLDER_IDS
    for name in ("configuration_modrwkv.py", "modeling_modrwkv.py", "tokenization_modrwkv.py", "world_tokenizer.py",
                 "wavenet.py", "tokenizer_config.json", "generation_config.json", "rwkv_vocab_v20230424.txt"):
        assert (export / name).is_file(), name
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [END_OF_TEXT, *WorldTokenizer().encode("\n\n")]  # the trained turn end
    weights, ours = load_file(export / "model.safetensors"), model.state_dict()
    assert weights.keys() == ours.keys()
    assert all(weights[k].dtype == torch.float32 and torch.equal(weights[k], ours[k]) for k in ours)


def test_exporting_a_bf16_model_leaves_it_bf16(exported, tmp_path):
    model, root = exported
    half = tiny_model().to(torch.bfloat16)
    export_hf(half, root / "model", tmp_path / "export")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(tmp_path / "export" / "model.safetensors").values()} == {torch.float32}


def test_an_adapter_only_folder_exports_with_its_recorded_backbone(exported, tmp_path):
    model, root = exported
    model.backbone.save_pretrained(tmp_path / "backbone")
    model.save_pretrained(tmp_path / "phase1", adapter_only=True, backbone_source={"path": str(tmp_path / "backbone")})
    assert main(["export", "--to", "hf", str(tmp_path / "phase1"), str(tmp_path / "export")]) == 0
    weights = load_file(tmp_path / "export" / "model.safetensors")
    full = load_file(root / "export" / "model.safetensors")
    assert weights.keys() == full.keys() and all(torch.equal(weights[k], full[k]) for k in full)


def test_an_export_replaces_only_an_earlier_export_of_its_kind(exported, tmp_path, capsys):
    """One file name (config.json, model.safetensors) would replace another model's: exporting into the backbone a
    folder records, into another model or into an export of the other kind is refused, and nothing is written."""
    model, root = exported
    model.backbone.save_pretrained(tmp_path / "backbone")
    model.save_pretrained(tmp_path / "phase1", adapter_only=True, backbone_source={"path": str(tmp_path / "backbone")})
    backbone_files = {p.name: p.read_bytes() for p in (tmp_path / "backbone").iterdir()}
    for target, out, reason in (("fla", tmp_path / "backbone", "would overwrite the backbone"),
                                ("hf", tmp_path / "phase1", "would overwrite the model folder it reads"),
                                ("hf", tmp_path / "backbone", "would overwrite the backbone"),
                                ("fla", root / "export", "holds other files than an earlier fla export")):
        assert main(["export", "--to", target, str(tmp_path / "phase1"), str(out)]) == 2
        assert f"{out}: " in (err := capsys.readouterr().err) and reason in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "backbone").iterdir()} == backbone_files
    export_fla(model, root / "model", tmp_path / "fla-backbone")  # an fla folder given as the backbone
    assert main(["export", "--to", "fla", "--backbone", str(tmp_path / "fla-backbone"), str(tmp_path / "phase1"),
                 str(tmp_path / "fla-backbone")]) == 2
    assert "would overwrite the backbone it reads" in capsys.readouterr().err
    model.save_pretrained(tmp_path / "other")  # another model's folder, not named by this one's records
    assert main(["export", "--to", "hf", str(root / "model"), str(tmp_path / "other")]) == 2
    assert "holds other files than an earlier hf export" in capsys.readouterr().err
    assert main(["export", "--to", "hf", str(tmp_path / "phase1"), str(root / "export")]) == 0  # an export again


def test_the_fla_export_gives_the_backbone_back(exported, tmp_path):
    model, root = exported
    assert main(["export", "--to", "fla", str(root / "model"), str(tmp_path / "fla")]) == 0
    assert json.loads((tmp_path / "fla" / "config.json").read_text())["model_type"] == "rwkv7"
    convert_fla_to_rwkv_pth(tmp_path / "fla", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    ours = model.backbone.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours if k not in UNUSED_LAYER0)
    assert not any(back[k].any() for k in UNUSED_LAYER0)  # fla has no slot for them: zeros, as RWKV-LM loads them


def test_a_folder_that_is_no_modrwkv_model_is_a_clear_error(exported, tmp_path, capsys):
    _, root = exported
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "modrwkv_config.json").write_text("{}")
    cases = {"empty": "no modrwkv_config.json; expected a ModRWKV save_pretrained directory",
             "no_weights": "neither model.safetensors nor adapter.safetensors"}
    for folder, reason in cases.items():
        assert main(["export", "--to", "hf", str(tmp_path / folder), str(tmp_path / "out")]) == 2
        assert f"{tmp_path / folder}: {reason}" in capsys.readouterr().err
    assert main(["export", "--to", "fla", str(root / "model"), str(root / "model")]) == 2
    assert "would overwrite the model folder it reads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_help_names_both_targets(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("--to {hf,fla}", "trust_remote_code", "model_dir"))
