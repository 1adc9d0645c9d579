import re
import shutil

import pytest
import torch

from modrwkv import RWKV7Config
from modrwkv.checkpoint import CheckpointError
from modrwkv.conversation import IGNORE, PLACEHOLDER_IDS, Sample, Turn, prompt_ids, tokenize_conversation
from modrwkv.generation import GenerationConfig, generate
from modrwkv.model_folder import read_backbone_source, read_encoders_record
from modrwkv.multimodal import ModRWKV, ModRWKVConfig, Projector, ProjectorConfig
from modrwkv.tokenizer import WorldTokenizer
from tests.conftest import random_backbone

BACKBONE = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=64, head_size=16)


@pytest.fixture(scope="module")
def tok():
    return WorldTokenizer()


def tiny_model(forecast_horizon=0, seed=0, forecast_lookback=0) -> ModRWKV:
    torch.manual_seed(seed)
    config = ModRWKVConfig(
        backbone=BACKBONE,
        projectors={
            "image": ProjectorConfig(encoder_dim=24, model_dim=64, kernel=3, stride=2, adapter_scale=2),
            "audio": ProjectorConfig(encoder_dim=16, model_dim=64),
            "series": ProjectorConfig(encoder_dim=8, model_dim=64, adapter_scale=4),
        },
        forecast_horizon=forecast_horizon,
        forecast_lookback=forecast_lookback,
    )
    return ModRWKV(config, backbone=random_backbone(BACKBONE, seed=seed))


@pytest.mark.parametrize("kernel_stride,expected", [((0, 0), 577), ((3, 2), 288), ((4, 3), 192), ((5, 4), 144)])
def test_compression_lengths_table7(kernel_stride, expected):
    k, s = kernel_stride
    cfg = ProjectorConfig(encoder_dim=32, model_dim=16, kernel=k, stride=s)
    assert cfg.compressed_length(577) == expected
    assert Projector(cfg)(torch.randn(577, 32)).shape == (expected, 16)


def test_projector_config_errors():
    with pytest.raises(ValueError, match="compression"):
        ProjectorConfig(encoder_dim=8, model_dim=8, kernel=3, stride=0)
    with pytest.raises(ValueError, match="compression stride 4 is over its kernel 3: the vectors between windows"):
        ProjectorConfig(encoder_dim=8, model_dim=8, kernel=3, stride=4)
    with pytest.raises(ValueError, match="width 9"):
        Projector(ProjectorConfig(encoder_dim=8, model_dim=8))(torch.randn(4, 9))


def test_projector_normalises_with_the_stats_it_is_given_and_saves_them(tmp_path):
    torch.manual_seed(0)
    plain = Projector(ProjectorConfig(encoder_dim=8, model_dim=16, kernel=3, stride=2))
    scaled = Projector(ProjectorConfig(encoder_dim=8, model_dim=16, kernel=3, stride=2, normalize="standardize"))
    whitened = Projector(ProjectorConfig(encoder_dim=8, model_dim=16, kernel=3, stride=2, normalize="whiten"))
    scaled.load_state_dict({**plain.state_dict(), "feature_mean": torch.zeros(8), "feature_std": torch.ones(8)})
    whitened.load_state_dict({**plain.state_dict(), "feature_mean": torch.zeros(8), "feature_whitening": torch.eye(8)})
    x = torch.randn(2, 9, 8) * 5 + 3
    assert torch.equal(scaled(x), plain(x)) and torch.equal(whitened(x), plain(x))  # identity until stats are set
    mean, std, w = torch.linspace(-1, 1, 8), torch.linspace(0.5, 4, 8), torch.randn(8, 8)
    scaled.set_feature_stats(mean, std)
    assert torch.allclose(scaled(x), plain((x - mean) / std), atol=1e-6)
    whitened.set_feature_stats(mean, whitening=w)
    assert torch.allclose(whitened(x), plain((x - mean) @ w), atol=1e-5)
    with pytest.raises(ValueError, match="every entry > 0"):
        scaled.set_feature_stats(mean, torch.zeros(8))
    with pytest.raises(ValueError, match=r"finite \[8, 8\] matrix"):
        whitened.set_feature_stats(mean, whitening=torch.ones(8))
    with pytest.raises(ValueError, match="does not normalise"):
        plain.set_feature_stats(mean, std)
    with pytest.raises(ValueError, match="normalize must be none, standardize or whiten"):
        ProjectorConfig(encoder_dim=8, model_dim=8, normalize="pca")

    config = ModRWKVConfig(backbone=BACKBONE, projectors={
        "image": ProjectorConfig(encoder_dim=8, model_dim=64, kernel=3, stride=2, normalize="whiten")})
    model = ModRWKV(config, backbone=random_backbone(BACKBONE))
    model.projectors["image"].set_feature_stats(mean, whitening=w)
    model.save_pretrained(tmp_path, adapter_only=True)
    again = ModRWKV.from_pretrained(tmp_path, backbone=model.backbone)
    assert torch.equal(again.projectors["image"].feature_whitening, w)
    assert ModRWKVConfig.from_dict(config.to_dict()).projectors["image"].normalize == "whiten"


def test_a_bf16_model_normalises_its_features_in_fp32():
    """Cast to bf16 (as DeepSpeed and prepare_for_inference cast it) and under autocast, a projector keeps its
    feature statistics in fp32 and whitens fp16 features as an fp32 one does: features whose spread is small
    beside their mean (a frozen encoder's) come out unit-variance in every direction, where bf16 arithmetic would
    add percents of noise to the smallest ones."""
    torch.manual_seed(0)
    d = 32
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    spread = torch.logspace(-2, 0, d, dtype=torch.float64)  # directions with 1/100 of the largest's spread
    x = (torch.randn(4000, d, dtype=torch.float64) * spread) @ basis.T + 3.0
    mean, cov = x.mean(0), torch.cov(x.T)
    values, vectors = torch.linalg.eigh(cov)
    whitening = (vectors / values.sqrt()) @ vectors.T
    features = x.half()  # as the cache stores them
    reference = (features.double() - mean) @ whitening

    projector = Projector(ProjectorConfig(encoder_dim=d, model_dim=16, normalize="whiten"))
    projector.set_feature_stats(mean.float(), whitening=whitening.float())
    fp32 = projector.normalise(features)
    projector.bfloat16()
    assert projector.feature_whitening.dtype == projector.feature_mean.dtype == torch.float32
    assert projector.adapter[0].weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = projector.normalise(features)
    for normalised in (projector.normalise(features), under_autocast):
        assert normalised.dtype == torch.float32 and torch.equal(normalised, fp32)
    error = ((fp32.double() - reference) @ vectors).square().mean(0).sqrt()  # per direction; each has unit spread
    bf16 = ((features.bfloat16() - mean.bfloat16()) @ whitening.bfloat16()).double()
    bf16_error = ((bf16 - reference) @ vectors).square().mean(0).sqrt()
    assert error.max() < 1e-4 and bf16_error[:4].min() > 100 * error.max()
    assert projector(features, torch.bfloat16).dtype == torch.bfloat16
    # built on the meta device (no values to keep), it materialises like any module, its statistics in fp32
    with torch.device("meta"):
        empty = Projector(ProjectorConfig(encoder_dim=d, model_dim=16, normalize="whiten"))
    empty.to_empty(device="cpu")
    assert empty.feature_whitening.device.type == "cpu" and empty.feature_whitening.dtype == torch.float32


def test_conversation_labels_only_on_assistant_turns(tok):
    turns = [Turn("user", "<image>\nWhat digit is this?"), Turn("assistant", "seven"),
             Turn("user", "And this <audio>?"), Turn("assistant", "hello")]
    ids, labels = tokenize_conversation(tok, turns, [5, 3], "s1")
    assert len(ids) == len(labels)
    assert ids.count(PLACEHOLDER_IDS["image"]) == 5 and ids.count(PLACEHOLDER_IDS["audio"]) == 3
    learned = [t for t, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(learned) == " seven\n\n hello\n\n"
    assert all(l == IGNORE for t, l in zip(ids, labels) if t in PLACEHOLDER_IDS.values())
    # the user text after the second placeholder is in place, not shifted into labels
    assert all(l == t for t, l in zip(ids, labels) if l != IGNORE)


def test_placeholder_count_mismatch_names_the_sample(tok):
    with pytest.raises(ValueError, match="sample digits-17: the text has 1 modality placeholders but 2"):
        tokenize_conversation(tok, [Turn("user", "<image> hi"), Turn("assistant", "x")], [4, 4], "digits-17")
    model = tiny_model()
    ids = torch.tensor([prompt_ids(tok, "<image> what?", [5])])
    with pytest.raises(ValueError, match="sample q9: 5 <image> positions but the features give 3"):
        model.embed(ids, [[("image", torch.randn(7, 24))]], sample_ids=["q9"])  # 7 -> (7-3)//2+1 = 3


def test_features_land_on_placeholder_positions(tok):
    model = tiny_model()
    feats = torch.randn(9, 24)
    ids = torch.tensor([prompt_ids(tok, "<image> what?", [4])])
    embeds = model.embed(ids, [[("image", feats)]])
    pos = (ids[0] == PLACEHOLDER_IDS["image"]).nonzero().squeeze(-1)
    torch.testing.assert_close(embeds[0, pos], model.projectors["image"](feats))
    others = ids[0] != PLACEHOLDER_IDS["image"]
    torch.testing.assert_close(embeds[0, others], model.backbone.emb(ids[0, others]))


def test_features_splice_into_fp32_embeddings_under_bf16_autocast(tok):
    """How the one-process trainer runs on a GPU: autocast leaves the embedding in fp32, the projector in bf16."""
    model = tiny_model()
    model.set_phase(1)
    ids = torch.tensor([prompt_ids(tok, "<image> what?", [4])])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, [[("image", torch.randn(9, 24))]], labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.projectors["image"].adapter[0].weight.grad.abs().sum() > 0


def test_end_of_text_written_in_a_turn_is_text_in_training_as_in_chat(tok):
    """A scraped conversation's literal "<|endoftext|>" was token 0 in training and evaluation prompts, text in chat
    and serving: now text everywhere; a turn's placeholders stay tokens."""
    from modrwkv.chat import ChatSession
    from modrwkv.tokenizer import END_OF_TEXT

    question = "a<|endoftext|>b"
    ids, _ = tokenize_conversation(tok, [Turn("user", question), Turn("assistant", "c")], [])
    assert END_OF_TEXT not in ids
    session = ChatSession(tiny_model().eval(), tok)
    assert prompt_ids(tok, question, []) == session.prompt_ids + session.question_ids(question)
    assert prompt_ids(tok, "<audio>\nhi", [2]).count(PLACEHOLDER_IDS["audio"]) == 2


def test_a_forecast_question_is_text_but_for_its_series_placeholder(tok):
    """A served request's question: `<image>` was read as a placeholder (refused: 2 placeholders for 1 series) and
    `<|endoftext|>` as token 0; a plain question keeps the tokens of the user turn forecasting trains on."""
    from modrwkv.chat import forecast_series
    from modrwkv.conversation import PLACEHOLDERS
    from modrwkv.tokenizer import END_OF_TEXT

    series = {PLACEHOLDERS["series"]}
    odd = prompt_ids(tok, "<series>\nWhat is <image>?<|endoftext|>", [3], specials=series)
    assert odd.count(PLACEHOLDER_IDS["series"]) == 3 and PLACEHOLDER_IDS["image"] not in odd and END_OF_TEXT not in odd
    assert prompt_ids(tok, "<series>\nForecast.", [3], specials=series) == prompt_ids(tok, "<series>\nForecast.", [3])
    model = tiny_model(forecast_horizon=6).eval()
    forecast = forecast_series(model, tok, "What is <image>?<|endoftext|>", torch.randn(6, 8), torch.randn(6), 0.0, 1.0)
    assert len(forecast) == 6


def test_phase_parameters():
    model = tiny_model(forecast_horizon=6)
    model.set_phase(1)
    phase1 = set(model.trainable_parameters())
    assert phase1 == {n for n, _ in model.named_parameters() if n.startswith(("projectors.", "forecast_"))}
    assert "projectors.image.compress.weight" in phase1 and "projectors.audio.adapter.2.weight" in phase1
    model.set_phase(2)
    assert set(model.trainable_parameters()) == {n for n, _ in model.named_parameters()}


def test_trimodal_sample_forward_backward_and_phase1_gradients(tok):
    model = tiny_model(forecast_horizon=6)
    model.set_phase(1)
    turns = [Turn("user", "<image> <audio> <series> describe"), Turn("assistant", "a cat says hi")]
    feats = [("image", torch.randn(11, 24)), ("audio", torch.randn(4, 16)), ("series", torch.randn(6, 8))]
    lengths = [model.config.projectors[m].compressed_length(f.shape[0]) for m, f in feats]
    ids, labels = tokenize_conversation(tok, turns, lengths, "tri")
    out = model(torch.tensor([ids]), [feats], labels=torch.tensor([labels]), series_target=torch.randn(1, 6))
    assert out.lm_loss is not None and out.forecast_loss is not None
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {n for n, _ in model.named_parameters() if n.startswith(("projectors.", "forecast_head."))}


def test_save_load_round_trip_full_and_adapter_only(tmp_path, tok):
    model = tiny_model(forecast_horizon=3)
    ids = torch.tensor([prompt_ids(tok, "<image> what?", [4])])
    feats = [[("image", torch.randn(9, 24))]]
    with torch.no_grad():
        expected = model(ids, feats).logits
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "adapter", adapter_only=True)
    with torch.no_grad():
        assert torch.equal(ModRWKV.from_pretrained(tmp_path / "full")(ids, feats).logits, expected)
        again = ModRWKV.from_pretrained(tmp_path / "adapter", backbone=model.backbone)
        assert torch.equal(again(ids, feats).logits, expected)
    with pytest.raises(ValueError, match="needs the backbone"):
        ModRWKV.from_pretrained(tmp_path / "adapter")
    # with the backbone's source recorded beside it, the adapter loads alone (as eval, chat and lmms-eval do)
    model.backbone.save_pretrained(tmp_path / "backbone")
    model.save_pretrained(tmp_path / "recorded", adapter_only=True, backbone_source={"path": str(tmp_path / "backbone")})
    assert not (tmp_path / "recorded" / "model.safetensors").exists()
    with torch.no_grad():
        assert torch.equal(ModRWKV.from_pretrained(tmp_path / "recorded")(ids, feats).logits, expected)


def test_a_save_into_a_folder_replaces_the_weights_another_save_left_there(tmp_path, tok):
    """Phase I (adapter only) run again into the folder phase II saved whole: the new adapter is what loads, not the
    old full weights, read first when both files lay there."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        model.projectors["image"].adapter[0].weight.add_(1.0)
    model.save_pretrained(tmp_path / "model", adapter_only=True)
    assert sorted(p.name for p in (tmp_path / "model").glob("*.safetensors")) == ["adapter.safetensors"]
    again = ModRWKV.from_pretrained(tmp_path / "model", backbone=model.backbone)
    assert torch.equal(again.projectors["image"].adapter[0].weight, model.projectors["image"].adapter[0].weight)
    model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").glob("*.safetensors")) == ["model.safetensors"]
    shutil.copy(tmp_path / "model" / "model.safetensors", tmp_path / "model" / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="both model.safetensors and adapter.safetensors, from two saves"):
        ModRWKV.from_pretrained(tmp_path / "model")


def test_a_damaged_model_folder_is_an_error_naming_its_file(tmp_path):
    """A config of another program's, or weights cut short by a full disk, raised a bare KeyError or SafetensorError
    that named no file."""
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    config, weights = folder / "modrwkv_config.json", folder / "model.safetensors"
    good = config.read_text()
    for text, reason in (("{}", "not a ModRWKV config (KeyError: 'backbone')"), ("[1]", "holds a JSON list, not an "
                                                                                      "object"), ("{", "not JSON")):
        config.write_text(text)
        with pytest.raises(CheckpointError, match=re.escape(f"{config}: {reason}")):
            ModRWKV.from_pretrained(folder)
        with pytest.raises(CheckpointError, match=re.escape(f"{config}: {reason}")):
            ModRWKVConfig.read(folder)
    config.write_text(good)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: not a readable safetensors file")):
        ModRWKV.from_pretrained(folder)


def test_an_adapter_on_a_bf16_backbone_folder_loads_in_one_dtype_and_runs(tmp_path, tok):
    """Phase I on a bf16 backbone folder (supported for training) saves an adapter-only model: it loads in fp32 as a
    full folder does, or in the dtype of a backbone given to it, never half and half."""
    model = tiny_model()
    model.backbone.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.save_pretrained(tmp_path / "phase1", adapter_only=True, backbone_source={"path": str(tmp_path / "bf16")})
    ids = torch.tensor([prompt_ids(tok, "<image> what?", [4])])
    for backbone, dtype in ((None, torch.float32), (model.backbone, torch.bfloat16)):
        loaded = ModRWKV.from_pretrained(tmp_path / "phase1", backbone=backbone)
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        with torch.no_grad():
            logits, _ = loaded.prefill(ids, [[("image", torch.randn(9, 24))]])
        assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_a_given_state_dict_is_saved_in_place_of_the_modules_and_must_match_its_names_and_shapes(tmp_path):
    model = tiny_model()
    state = {k: v + 1 for k, v in model.state_dict().items()}  # as a trainer's master weights differ from its module
    model.save_pretrained(tmp_path / "given", state_dict=state)
    loaded = ModRWKV.from_pretrained(tmp_path / "given").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    adapter = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    model.save_pretrained(tmp_path / "adapter", adapter_only=True, state_dict=adapter)  # the backbone not needed
    again = ModRWKV.from_pretrained(tmp_path / "adapter", backbone=model.backbone).state_dict()
    assert all(torch.equal(again[k], v) for k, v in adapter.items())
    with pytest.raises(ValueError, match=r"state_dict's projectors.image.adapter.0.weight is \(1, 1\), the model's"):
        model.save_pretrained(tmp_path / "reshaped", state_dict={**state, "projectors.image.adapter.0.weight":
                                                                 torch.zeros(1, 1)})
    del state["projectors.image.adapter.0.weight"]
    with pytest.raises(ValueError, match=r"tensor names \(1 differ, e.g. projectors.image.adapter.0.weight\)"):
        model.save_pretrained(tmp_path / "partial", state_dict=state)
    assert not (tmp_path / "partial").exists() and not (tmp_path / "reshaped").exists()


def test_an_adapter_only_folder_copied_elsewhere_finds_its_backbone(tmp_path, tok):
    """A run tree (backbone and adapter-only model) copied to another place, the original removed: the model
    finds the copied backbone by its relative path and keeps its encoder record; a backbone with other weights
    there is refused, named. The folder holds the files model_folder.py lists, and no other."""
    model = tiny_model()
    ids = torch.tensor([prompt_ids(tok, "<image> what?", [4])])
    feats = [[("image", torch.randn(9, 24))]]
    with torch.no_grad():
        expected = model(ids, feats).logits
    original = tmp_path / "machine_a"
    model.backbone.save_pretrained(original / "backbone")
    store_key = {"kind": "dinov2", "dtype": "fp32", "image_size": 112, "layer": 8, "weights_hash": "ab" * 32,
                 "limits": {"max_image_pixels": 4096}}  # the limits decide which items are kept, not their features
    model.save_pretrained(original / "runs" / "phase1" / "model", adapter_only=True,
                          backbone_source={"path": str(original / "backbone"), "run_id": "r1"},
                          encoders={"image": store_key})
    assert sorted(p.name for p in (original / "runs" / "phase1" / "model").iterdir()) == [
        "adapter.safetensors", "backbone_source.json", "encoders.json", "modrwkv_config.json"]
    copied = tmp_path / "machine_b" / "elsewhere"
    shutil.copytree(original, copied)
    shutil.rmtree(original)
    folder = copied / "runs" / "phase1" / "model"
    with torch.no_grad():
        assert torch.equal(ModRWKV.from_pretrained(folder)(ids, feats).logits, expected)
    assert read_encoders_record(folder) == {"image": {**{k: v for k, v in store_key.items() if k != "limits"},
                                                      "revision": None, "precision": None, "lookback": None}}
    assert read_backbone_source(folder)["run_id"] == "r1"

    tiny_model(seed=1).backbone.save_pretrained(copied / "backbone")  # another backbone in its place
    with pytest.raises(CheckpointError, match="hold other weights than the recorded sha256"):
        ModRWKV.from_pretrained(copied / "runs" / "phase1" / "model")


def series_batch(tok, model, n, lookback_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [[("series", torch.randn(6, 8, generator=g))] for _ in range(n)]
    ids = torch.tensor([prompt_ids(tok, "<series> next?", [6])] * n)
    return ids, feats, torch.randn(n, lookback_len, generator=g)


def test_forecast_skip_starts_as_the_naive_forecast_and_round_trips(tmp_path, tok):
    model = tiny_model(forecast_horizon=5, forecast_lookback=12).eval()
    ids, feats, lookback = series_batch(tok, model, 3, 20)  # a longer lookback: its last 12 values are read
    with torch.no_grad():
        forecast = model(ids, feats, series_lookback=lookback).forecast
    assert torch.equal(forecast, lookback[:, -1:].expand(3, 5))
    with pytest.raises(ValueError, match="pass series_lookback"):
        model(ids, feats)
    with pytest.raises(ValueError, match=r"\[B, >= 12\]"):
        model(ids, feats, series_lookback=lookback[:, :7])
    with pytest.raises(ValueError, match="needs a forecast_horizon"):
        ModRWKVConfig(backbone=BACKBONE, forecast_lookback=4)
    with torch.no_grad():
        model.forecast_skip.weight.normal_()
        expected = model(ids, feats, series_lookback=lookback).forecast
    model.save_pretrained(tmp_path / "adapter", adapter_only=True)
    again = ModRWKV.from_pretrained(tmp_path / "adapter", backbone=model.backbone)
    assert again.config.forecast_lookback == 12
    with torch.no_grad():
        assert torch.equal(again(ids, feats, series_lookback=lookback).forecast, expected)


@pytest.mark.slow
def test_forecast_skip_learns_a_linear_map_of_the_lookback_in_phase_one(tok):
    """A target that is a fixed linear map of the lookback: the skip fits it, the head alone cannot."""
    g = torch.Generator().manual_seed(1)
    true_map = torch.randn(8, 3, generator=g) / 3
    final = {}
    for lookback_len in (0, 8):
        model = tiny_model(forecast_horizon=3, forecast_lookback=lookback_len)
        model.set_phase(1)
        # 60 steps at 3e-2: the skip's loss 1.3-1.7 % of the head's over three target maps (150 at 1e-2: 5.6 %)
        opt = torch.optim.Adam(model.trainable_parameters().values(), lr=3e-2)
        for step in range(60):
            ids, feats, lookback = series_batch(tok, model, 16, 8, seed=step)
            out = model(ids, feats, series_target=lookback @ true_map, series_lookback=lookback)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        final[lookback_len] = out.forecast_loss.item()
    assert final[8] < 0.1 * final[0]  # the head alone stays near the target's variance (~1)


def test_prefix_state_reuse_gives_the_answers_of_re_encoding(tok):
    model = tiny_model()
    image = [("image", torch.randn(13, 24))]
    n = model.config.projectors["image"].compressed_length(13)
    cfg = GenerationConfig(max_new_tokens=6, temperature=0, stop_tokens=())
    questions = ["What digit is this?", "Is it round?", "Colour?"]
    # encode the image once into the state
    prefix = prompt_ids(tok, "<image>", [n])[: -len(tok.encode("\n\nAssistant:"))]
    _, image_state = model.prefill(torch.tensor([prefix]), [image])
    reused, fresh = [], []
    for q in questions:
        rest = tok.encode(f"\n{q}\n\nAssistant:")
        logits, state = model.backbone(torch.tensor([rest]), state=image_state.clone(), logits_to_keep=1)
        reused.append(generate(model.backbone, [rest], cfg, state=state, first_logits=logits[:, -1]).tokens[0])
        full = prompt_ids(tok, f"<image>\n{q}", [n])
        assert full == prefix + rest
        first, state = model.prefill(torch.tensor([full]), [image])
        fresh.append(generate(model.backbone, [full], cfg, state=state, first_logits=first).tokens[0])
    assert reused == fresh


def test_wavenet_is_causal_and_trains_in_phase_one(tok):
    from modrwkv.wavenet import WaveNet, WaveNetConfig, denormalize_series, normalize_series

    net = WaveNet(WaveNetConfig(in_channels=1, hidden=8, layers=3))
    x = torch.randn(20, 1)
    y = net(x)
    x2 = x.clone()
    x2[12:] += 5.0
    assert torch.allclose(net(x2)[:12], y[:12]) and not torch.allclose(net(x2)[12:], y[12:])

    z, mean, std = normalize_series(torch.tensor([[1.0], [3.0], [5.0]]))
    torch.testing.assert_close(denormalize_series(z, mean, std), torch.tensor([[1.0], [3.0], [5.0]]))
    with pytest.raises(ValueError, match="sample co2-4: the series has NaN"):
        normalize_series(torch.tensor([[1.0], [float("nan")]]), "co2-4")

    config = ModRWKVConfig(backbone=BACKBONE, forecast_horizon=4, series_encoder=WaveNetConfig(hidden=8, layers=2),
                           projectors={"series": ProjectorConfig(encoder_dim=8, model_dim=64, kernel=2, stride=2)})
    model = ModRWKV(config, backbone=random_backbone(BACKBONE))
    model.set_phase(1)
    ids, labels = tokenize_conversation(tok, [Turn("user", "<series> next?"), Turn("assistant", "up")], [5], "s")
    out = model(torch.tensor([ids]), [[("series", torch.randn(10, 1))]], labels=torch.tensor([labels]),
                series_target=torch.randn(1, 4))
    out.loss.backward()
    assert all(p.grad is not None for p in model.series_encoder.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


def test_streamed_audio_chunks_equal_one_pass(tok):
    from modrwkv.chat import ChatSession

    model = tiny_model()
    chunks = [torch.randn(n, 16) for n in (7, 5, 9)]
    stream = ChatSession(model, tok)
    for chunk in chunks:  # audio arriving piece by piece; the state carries everything so far
        stream.add("audio", chunk)
    whole = ChatSession(model, tok)
    _, one_pass = model.prefill(torch.tensor([stream.prompt_ids]), [[("audio", c) for c in chunks]])
    for field in ("att_shift", "wkv", "ffn_shift"):
        torch.testing.assert_close(getattr(stream.media_state, field), getattr(one_pass, field), rtol=1e-4, atol=1e-5)
    assert stream.ask("What was said?") == ChatSession(model, tok, [("audio", c) for c in chunks]).ask("What was said?")
    assert whole.prompt_ids == tok.encode("User:")
    # the prompts are training's: the chunks one run of features, as the whole clip's; no media, no "\n" before it
    n = sum(model.config.projectors["audio"].compressed_length(len(c)) for c in chunks)
    assert stream.prompt_ids + stream.question_ids("What was said?") == prompt_ids(tok, "<audio>\nWhat was said?", [n])
    assert whole.prompt_ids + whole.question_ids("What is 2+2?") == prompt_ids(tok, "What is 2+2?", [])
    # an image of 2 vectors under a kernel of 3: named, as training names the sample it skips
    with pytest.raises(ValueError, match=r"this image item has 2 feature vectors, none left after the projector's "
                                         r"compression \(kernel 3\)"):
        whole.add("image", torch.randn(2, 24))


def test_a_batch_mixing_image_and_text_only_samples_trains(tok):
    """LLaVA's instruction data holds text-only conversations beside image ones, in the same cache."""
    import numpy as np

    from modrwkv.batching import Collator

    model = tiny_model(forecast_horizon=3, forecast_lookback=4)  # a forecaster too: no lookback needed here
    model.set_phase(2)
    image = Sample("with-image", "image", [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "a cat")],
                   items=[np.random.default_rng(0).standard_normal((9, 24)).astype(np.float32)])
    text = Sample("text-only", "image", [Turn("user", "Say hi."), Turn("assistant", "hi there")])
    batch = Collator(tok, model.config)([image, text])
    assert [len(items) for items in batch.features] == [1, 0]
    out = model(batch.input_ids, batch.features, attention_mask=batch.attention_mask, labels=batch.labels,
                sample_ids=batch.sample_ids, return_logits=False)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.forecast is None and out.forecast_loss is None
    assert model.projectors["image"].adapter[0].weight.grad.abs().sum() > 0
    assert model.backbone.emb.weight.grad.abs().sum() > 0


def test_a_forecast_is_read_at_the_same_position_in_training_and_evaluation(tok):
    """Training collates the forecasting conversation (a user turn alone); evaluation builds the prompt with
    prompt_ids. Both end at "Assistant:", so the head reads the hidden state it was trained on."""
    import numpy as np

    from modrwkv.batching import Collator

    model = tiny_model(forecast_horizon=3, forecast_lookback=5).eval()
    with torch.no_grad():
        model.forecast_head.weight.normal_()  # make the head's input matter
    rng = np.random.default_rng(0)
    samples = [Sample(f"w{i}", "series", [Turn("user", "<series>\nForecast the next 3 values.")],
                      items=[rng.standard_normal((6 + i, 8)).astype(np.float32)],
                      lookback=rng.standard_normal(5).astype(np.float32),
                      target=rng.standard_normal(3).astype(np.float32)) for i in range(2)]
    batch = Collator(tok, model.config)(samples)
    with torch.no_grad():
        trained_on = model(batch.input_ids, batch.features, attention_mask=batch.attention_mask,
                           series_lookback=batch.series_lookback).forecast
    for b, s in enumerate(samples):
        items = batch.features[b]
        ids = prompt_ids(tok, s.text("user"), [items[0][1].shape[0]], s.key)
        assert ids == batch.input_ids[b, : int(batch.attention_mask[b].sum())].tolist()
        with torch.no_grad():
            alone = model(torch.tensor([ids]), [items], series_lookback=batch.series_lookback[b : b + 1]).forecast
        assert torch.allclose(alone[0], trained_on[b], atol=1e-5)


def test_over_long_samples_raise_or_are_skipped_and_named(tok):
    import numpy as np

    from modrwkv.batching import Collator, OverLength

    model = tiny_model()
    feats = [np.zeros((9, 24), dtype=np.float32)]
    short = Sample("short", "image", [Turn("user", "<image>\nWhat?"), Turn("assistant", "cat")], items=feats)
    long = Sample("long", "image", [Turn("user", "<image>\n" + "word " * 200), Turn("assistant", "cat")], items=feats)
    with pytest.raises(OverLength, match="sample long: 2[0-9][0-9] tokens, over the context length 64"):
        Collator(tok, model.config, max_length=64)([short, long])
    batch = Collator(tok, model.config, max_length=64, skip_bad_samples=True)([long, short])
    assert batch.sample_ids == ["short"] and batch.input_ids.shape[0] == 1 and len(batch.features) == 1
    assert batch.skipped[0]["key"] == "long" and batch.skipped[0]["tokens"] > 200
    empty = Collator(tok, model.config, max_length=64, skip_bad_samples=True)([long])
    assert empty.sample_ids == [] and empty.input_ids.shape[0] == 0 and len(empty.skipped) == 1


def test_an_item_compressed_to_nothing_raises_or_is_skipped_and_named(tok):
    """Fewer feature vectors than the projector's compression kernel (50 ms of audio is 2 WavLM frames) leave no
    position for the item: the collator says so, or leaves the sample out with its reason, in either layout,
    instead of a batch the model's forward fails on."""
    import numpy as np

    from modrwkv.batching import Collator, TooShort

    model = tiny_model()  # image: kernel 3, stride 2
    turns = [Turn("user", "<image>\nWhat?"), Turn("assistant", "cat")]
    whole = Sample("whole", "image", turns, items=[np.zeros((9, 24), dtype=np.float32)])
    short = Sample("short", "image", turns, items=[np.zeros((2, 24), dtype=np.float32)])
    with pytest.raises(TooShort, match="sample short: its image item 0 has 2 feature vectors, none left after the "
                                       r"projector's compression \(kernel 3\)"):
        Collator(tok, model.config, max_length=64)([whole, short])
    collator = Collator(tok, model.config, max_length=64, skip_bad_samples=True)
    named = {"key": "short", "reason": "too_short", "modality": "image", "item": 0, "vectors": 2, "kernel": 3}
    padded = collator([short, whole])
    encoded, skipped = collator.encode_all([short, whole])
    packed = collator.pack([encoded], skipped)
    for batch in (padded, packed):
        assert batch.sample_ids == ["whole"] and batch.skipped == [named]
        out = model(batch.input_ids, batch.features, attention_mask=batch.attention_mask, labels=batch.labels,
                    cu_seqlens=batch.cu_seqlens)
        assert torch.isfinite(out.loss)


def test_a_sample_with_nothing_to_learn_raises_or_is_skipped_and_named(tok):
    """A conversation with no assistant turn (a cache encoded before encoding rejected it) labels no token: the
    collator says so, or leaves it out with its reason, so that no micro-batch of such samples has no loss."""
    import numpy as np

    from modrwkv.batching import Collator, NoAnswer

    model = tiny_model(forecast_horizon=3)
    features = [np.zeros((9, 24), dtype=np.float32)]
    asked = Sample("asked", "image", [Turn("user", "<image>\nWhat?")], items=features)
    answered = Sample("answered", "image", [Turn("user", "<image>\nWhat?"), Turn("assistant", "cat")], items=features)
    with pytest.raises(NoAnswer, match="sample asked: no assistant turn and no forecast target: nothing to learn"):
        Collator(tok, model.config, max_length=64)([answered, asked])
    batch = Collator(tok, model.config, max_length=64, skip_bad_samples=True)([asked, answered])
    assert batch.sample_ids == ["answered"] and batch.skipped == [{"key": "asked", "reason": "no_answer"}]
    series = Sample("window", "series", [Turn("user", "<series>\nNext?")], items=[np.zeros((4, 8), np.float32)],
                    target=np.zeros(3, np.float32))  # a forecast's answer is its target
    assert Collator(tok, model.config)([series]).sample_ids == ["window"]


def test_labels_series_targets_and_masks_that_would_score_the_wrong_thing_are_refused(tok):
    """Labels shifted already (HF style) would score every target at the wrong position, a label outside the
    vocabulary is a device assert on a GPU, a forecast target of another shape broadcasts against the forecast, and
    an empty prompt row would be given the logits of its padding: each a ValueError saying what was expected."""
    import numpy as np

    from modrwkv.batching import Collator, right_pad

    model = tiny_model(forecast_horizon=3)
    image = Sample("with-image", "image", [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "a cat")],
                   items=[np.random.default_rng(0).standard_normal((9, 24)).astype(np.float32)])
    batch = Collator(tok, model.config)([image])
    with pytest.raises(ValueError, match=r"labels must be shaped like input_ids \(1, \d+\), unshifted .* got "
                                         r"\(1, \d+\)"):
        model(batch.input_ids, batch.features, labels=batch.labels[:, 1:])
    labels = batch.labels.clone()
    labels[0, -1] = 70000
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 65536\) or -100 .* got \[70000\]"):
        model(batch.input_ids, batch.features, labels=labels)
    assert torch.isfinite(model(batch.input_ids, batch.features, labels=batch.labels).loss)

    ids, feats, _ = series_batch(tok, model, 2, 5)
    model(ids, feats, series_target=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"series_target must be \[forecasts, horizon\] = \(2, 3\), got \(2, 1\)"):
        model(ids, feats, series_target=torch.randn(2, 1))

    ids, mask, _ = right_pad([[1, 2, 3], [4]])
    mask[1] = 0
    with pytest.raises(ValueError, match=r"prefill: rows \[1\] of the attention_mask hold no token"):
        model.prefill(ids, [[], []], attention_mask=mask)


def test_prefill_of_padded_prompts_equals_each_prompt_alone():
    from modrwkv.batching import right_pad

    model = tiny_model(seed=5).eval()
    prompts = [[1, 2] + [65531] * 4 + [7, 8, 9], [3] + [65531] * 6]
    features = [[("audio", torch.randn(4, 16))], [("audio", torch.randn(6, 16))]]
    ids, mask, _ = right_pad(prompts)
    logits, state = model.prefill(ids, features, attention_mask=mask)
    as_floats, _ = model.prefill(ids, features, attention_mask=mask.float())  # a mask of any dtype, as the backbone's
    torch.testing.assert_close(as_floats, logits, rtol=0, atol=0)
    for row, (prompt, items) in enumerate(zip(prompts, features)):
        alone, alone_state = model.prefill(torch.tensor([prompt]), [items])
        torch.testing.assert_close(logits[row], alone[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(state.select([row]).wkv, alone_state.wkv, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_features_on_the_host_reach_a_model_on_the_gpu():
    """A chat or prefill on a GPU model given a cache's CPU features (on CPU, every other test's path)."""
    model = tiny_model().eval()
    ids, features = torch.tensor([[1] + [65531] * 4 + [7]]), [[("audio", torch.randn(4, 16))]]
    on_host, _ = model.prefill(ids, features)
    on_gpu, _ = model.cuda().prefill(ids, features)
    torch.testing.assert_close(on_gpu.cpu(), on_host, rtol=1e-4, atol=1e-4)


def packing_samples():
    """Image samples of several sizes (one with two items and two answers), an audio one and a text-only one."""
    import numpy as np

    rng = np.random.default_rng(3)
    image = lambda n: rng.standard_normal((n, 24)).astype(np.float32)  # noqa: E731
    return [
        Sample("small", "image", [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "a cat")], items=[image(5)]),
        Sample("two", "image", [Turn("user", "<image> and <image>: same?"), Turn("assistant", "no, they differ"),
                                Turn("user", "Why?"), Turn("assistant", "one is larger than the other")],
               items=[image(21), image(9)]),
        Sample("text", "image", [Turn("user", "Say hi."), Turn("assistant", "hi there")]),
        Sample("big", "image", [Turn("user", "<image>\nDescribe it in detail."),
                                Turn("assistant", "a small grey cat on a red chair near the window")],
               items=[image(41)]),
        Sample("audio", "audio", [Turn("user", "<audio>\nWhat was said?"), Turn("assistant", "seven")],
               items=[rng.standard_normal((11, 16)).astype(np.float32)]),
    ]


def run(model, batch, features=None):
    return model(batch.input_ids, features or batch.features, attention_mask=batch.attention_mask,
                 labels=batch.labels, sample_ids=batch.sample_ids, series_target=batch.series_target,
                 series_lookback=batch.series_lookback, cu_seqlens=batch.cu_seqlens, return_logits=False)


def with_grad(features):
    return [[(m, f.clone().requires_grad_()) for m, f in items] for items in features]


def test_packed_loss_is_the_per_token_mean_over_the_samples_run_separately(tok):
    """The LM loss of a batch is its summed next-token loss over its labelled tokens divided by their count (what
    the padded trainer computes: one cross-entropy mean over the micro-batch's labels). Packed rows give that loss,
    and the gradients of every parameter and every feature input, of one run per sample (fp32, 1e-5)."""
    from modrwkv.batching import Collator, first_fit_decreasing

    model = tiny_model(seed=2)
    model.set_phase(2)
    collator = Collator(tok, model.config, max_length=64)
    samples = packing_samples()

    def gradients(features):
        grads = [f.grad.clone() for items in features for _, f in items]
        grads += [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        return grads

    total, labelled, separate_grads = 0.0, 0, []
    singles = [collator([s]) for s in samples]
    features = [with_grad(b.features) for b in singles]
    for batch, feats in zip(singles, features):
        n = int((batch.labels[:, 1:] != IGNORE).sum())
        total = total + run(model, batch, feats).lm_loss * n  # this sample's summed loss
        labelled += n
    separate = total / labelled
    separate.backward()
    separate_grads = gradients([items for f in features for items in f])

    encoded, _ = collator.encode_all(samples)
    rows = first_fit_decreasing([len(e.ids) for e in encoded], 64)
    assert len(rows) < len(samples)  # some rows hold several samples
    packed = collator.pack([[encoded[i] for i in row] for row in rows])
    tokens = sum(len(e.ids) for e in encoded)
    assert packed.input_ids.shape == (1, tokens) and packed.padding_fraction == 1 - tokens / (len(rows) * 64)
    packed_features = with_grad(packed.features)
    out = run(model, packed, packed_features)
    out.lm_loss.backward()
    order = [packed.sample_ids.index(s.key) for s in samples]  # the packed grads in the samples' order
    packed_grads = gradients([packed_features[i] for i in order])
    assert abs(out.lm_loss.item() - separate.item()) < 1e-5 * separate.item()
    # the 5 feature items, every parameter but the series projector's 4 and layer 0's unused v0, v1, v2
    assert len(packed_grads) == len(separate_grads) == 5 + len(list(model.parameters())) - 7
    for got, want in zip(packed_grads, separate_grads):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5

    padded = run(model, collator(samples))  # the padded trainer's loss of the same samples
    assert abs(padded.lm_loss.item() - separate.item()) < 1e-5 * separate.item()


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_a_training_step_given_its_batch_on_the_host_reads_nothing_back(tok, layout, device_reads):
    """Training hands the model its ids, labels, mask and offsets on the host: placeholders, labelled positions
    and the layout are found there, so forward and backward of a multimodal batch (images, audio, text only) read
    nothing back from the device (on a GPU each read would wait for the queued work; it was one per sample and
    modality, plus the loss's, before)."""
    from modrwkv.batching import Collator

    model = tiny_model(seed=5)
    model.set_phase(2)
    collator = Collator(tok, model.config, max_length=400)
    samples = packing_samples()
    batch = collator.pack([collator.encode_all(samples)[0]]) if layout == "packed" else collator(samples)
    device_reads.clear()
    run(model, batch).loss.backward()
    assert device_reads == []
    assert all(p.grad is not None for p in model.backbone.blocks[1].parameters())


def test_packed_forecasts_equal_padded_ones(tok):
    import numpy as np

    from modrwkv.batching import Collator

    model = tiny_model(forecast_horizon=3, forecast_lookback=5, seed=1).eval()
    with torch.no_grad():
        model.forecast_head.weight.normal_()  # make the head's input matter
    rng = np.random.default_rng(0)
    samples = [Sample(f"w{i}", "series", [Turn("user", "<series>\nForecast the next 3 values.")],
                      items=[rng.standard_normal((4 + 3 * i, 8)).astype(np.float32)],
                      lookback=rng.standard_normal(5).astype(np.float32),
                      target=rng.standard_normal(3).astype(np.float32)) for i in range(3)]
    collator = Collator(tok, model.config, max_length=200)
    encoded, _ = collator.encode_all(samples)
    with torch.no_grad():
        padded, packed = run(model, collator(samples)), run(model, collator.pack([encoded]))
    assert packed.lm_loss is None and packed.forecast.shape == (3, 3)
    torch.testing.assert_close(packed.forecast, padded.forecast, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.forecast_loss, padded.forecast_loss, rtol=1e-5, atol=1e-7)


def test_a_change_in_one_packed_sample_reaches_no_other(tok):
    """Other features for one sample change no logit of any other sample in the row, bit for bit."""
    from modrwkv.batching import Collator

    model = tiny_model(seed=3).eval()
    collator = Collator(tok, model.config, max_length=400)
    encoded, _ = collator.encode_all(packing_samples())
    batch = collator.pack([encoded])
    changed = [list(items) for items in batch.features]
    changed[1] = [(m, f + 1.0) for m, f in changed[1]]  # the sample "two"
    with torch.no_grad():
        logits = model(batch.input_ids, batch.features, cu_seqlens=batch.cu_seqlens).logits
        logits2 = model(batch.input_ids, changed, cu_seqlens=batch.cu_seqlens).logits
    start, end = batch.cu_seqlens[1:3].tolist()
    assert torch.equal(logits2[:, :start], logits[:, :start]) and torch.equal(logits2[:, end:], logits[:, end:])
    assert not torch.equal(logits2[:, start:end], logits[:, start:end])


def test_first_fit_decreasing_fills_rows_in_order_of_length():
    from modrwkv.batching import first_fit_decreasing

    assert first_fit_decreasing([3, 9, 5, 2, 7, 1], 10) == [[1, 5], [4, 0], [2, 3]]  # 9+1, 7+3, 5+2
    assert first_fit_decreasing([], 10) == []
    assert first_fit_decreasing([10, 10], 10) == [[0], [1]]


def test_no_target_crosses_a_packed_boundary():
    """With every token labelled, a sample's last token would predict the next sample's first: the packed loss
    leaves those targets out, as separate runs do."""
    model = tiny_model(seed=4).eval()
    seqs = [torch.randint(1, 65000, (1, n), generator=torch.Generator().manual_seed(n)) for n in (6, 11, 3)]
    with torch.no_grad():
        summed = sum(model(s, [[]], labels=s).lm_loss * (s.shape[1] - 1) for s in seqs)
        row = torch.cat(seqs, dim=1)
        packed = model(row, [[], [], []], labels=row, cu_seqlens=torch.tensor([0, 6, 17, 20])).lm_loss
    assert abs(packed.item() - summed.item() / 17) < 1e-5 * packed.item()
