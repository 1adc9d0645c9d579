"""Frozen encoders built from tiny configs, saved to a temp dir and loaded through the same local-path code
that real weights use."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, Siglip2VisionConfig, Siglip2VisionModel,
    SiglipVisionConfig, SiglipVisionModel, Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel, WhisperConfig,
    WhisperModel,
)

from modrwkv.model_folder import read_encoders_record, write_records
from preprocessing.encoders import ENCODERS, build_encoder, build_inputs
from preprocessing.encoders.audio import length_groups
from preprocessing.encoders.fracast import FracastConfig, FracastNet, save_fracast
from preprocessing.cache.entry import FeatureStore
from preprocessing.cache.key import hash_model_dir
from preprocessing.encoders.recorded import encoder_for
from preprocessing.encoders.timer import TimerConfig, TimerModel
from preprocessing.items import Audio

from .test_series_encoders import seasonal

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
VISION = {
    "clip": (CLIPVisionModel, CLIPVisionConfig(image_size=32, patch_size=8, **TINY), 16 + 1),  # + CLS
    "siglip": (SiglipVisionModel, SiglipVisionConfig(image_size=32, patch_size=8, **TINY), 16),
    "dinov2": (Dinov2Model, Dinov2Config(image_size=28, patch_size=14, **TINY), 4 + 1),  # + CLS
    "siglip2": (Siglip2VisionModel, Siglip2VisionConfig(patch_size=8, num_patches=16, **TINY), None),
}


WHISPER = WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
WAVLM = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
TINY_MODELS = {  # kind -> a random tiny model of it, saved the way real weights are
    **{kind: lambda path, kind=kind: VISION[kind][0](VISION[kind][1]).save_pretrained(path) for kind in VISION},
    "whisper": lambda path: WhisperModel(WHISPER).save_pretrained(path),
    "wavlm": lambda path: WavLMModel(WAVLM).save_pretrained(path),
    "timer": lambda path: TimerModel(TimerConfig(input_token_len=8, **TINY)).save_pretrained(path),
    "fracast": lambda path: save_fracast(FracastNet(FracastConfig(d_model=16, context=64, stages=4)), path),
}


def rgb(seed, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", sorted(VISION))
def test_vision_encoders_load_from_a_local_dir(tmp_path, kind):
    model_class, config, length = VISION[kind]
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path)
    encoder = build_encoder(kind, tmp_path)
    assert encoder.output_dim == 32
    feats = encoder.encode([rgb(0), rgb(1, (25, 60))], ["a", "b"])
    assert len(feats) == 2 and all(f.shape[-1] == 32 and torch.isfinite(f).all() for f in feats)
    if length is not None:
        assert [f.shape[0] for f in feats] == [length, length]
    else:  # NaFlex: at most num_patches real patches per image
        assert all(0 < f.shape[0] <= 16 for f in feats)
    assert not torch.equal(feats[0][: min(len(f) for f in feats)], feats[1][: min(len(f) for f in feats)])
    assert len(encoder.weights_hash()) == 64
    with pytest.raises(ValueError, match="sample gray-3: expected an RGB image, got PIL mode 'L'"):
        encoder.encode([rgb(0).convert("L")], ["gray-3"])
    if kind != "siglip2":  # a size its patches do not tile lost its last pixels without a word (siglip2's: below)
        patch = config.patch_size
        assert build_inputs(kind, tmp_path, image_size=2 * patch).processor.size["height"] == 2 * patch
        with pytest.raises(ValueError, match=f"{kind}'s image_size {2 * patch + 3} is not a multiple of its patch "
                                             f"size {patch}: the last 3 pixels"):
            build_inputs(kind, tmp_path, image_size=2 * patch + 3)


def test_siglip2s_image_size_sets_its_patch_budget(tmp_path):
    """NaFlex never reads a square size: image_size is the budget of a square that size (the paper's 577 tokens
    need 576 patches, not the base's default 256)."""
    model_class, config, _ = VISION["siglip2"]  # patch 8, a default budget of 16
    model_class(config).save_pretrained(tmp_path)
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    assert build_encoder("siglip2", tmp_path).encode([wide])[0].shape[0] <= 16
    features = build_encoder("siglip2", tmp_path, image_size=48).encode([wide])[0]
    assert 16 < features.shape[0] <= 36  # (48 / 8)² patches at most, the image's 2:1 kept
    assert build_inputs("siglip2", tmp_path, image_size=48).processor.max_num_patches == 36
    with pytest.raises(ValueError, match="siglip2's image_size 50 is not a multiple of its patch size 8"):
        build_inputs("siglip2", tmp_path, image_size=50)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    """DINOv2 with registers loaded as DINOv2 ran without its registers, with a warning at most."""
    from transformers import CLIPConfig, CLIPModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    _, config, _ = VISION["dinov2"]
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**{**config.to_dict(), "num_register_tokens": 4})) \
        .save_pretrained(tmp_path / "registers")
    with pytest.raises(ValueError, match="a dinov2_with_registers checkpoint, not the dinov2 model"):
        build_encoder("dinov2", tmp_path / "registers")
    _, vision, length = VISION["clip"]
    CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                                      "num_attention_heads": 2,
                                                                      "intermediate_size": 64})) \
        .save_pretrained(tmp_path / "whole-clip")  # a whole CLIP: its vision tower is what the encoder reads
    assert build_encoder("clip", tmp_path / "whole-clip").encode([rgb(0)])[0].shape[0] == length
    # the speech and Timer encoders too: a HuBERT folder read as WavLM gave features that changed from load to load
    from transformers import HubertConfig, HubertModel

    HubertModel(HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)) \
        .save_pretrained(tmp_path / "hubert")
    for kind, expected in (("wavlm", "wavlm"), ("whisper", "whisper"), ("timer", "timer")):
        with pytest.raises(ValueError, match=f"hubert: a hubert checkpoint, not the {expected} model the {kind}"):
            build_encoder(kind, tmp_path / "hubert")


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_a_processor_that_sizes_each_image_its_own_way_encodes_a_mixed_batch_as_each_alone(tmp_path, kind):
    """A shipped preprocessor_config.json with no crop after a shortest-edge resize (or no resize) gave each aspect
    ratio its own pixel shape: the first batch of mixed images failed to stack and stopped the whole encode job."""
    import json

    model_class, config, length = VISION[kind]
    model_class(config).save_pretrained(tmp_path)
    settings = {**build_inputs(kind, tmp_path).processor.to_dict(), "size": {"shortest_edge": 16},
                "do_center_crop": False}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    encoder = build_encoder(kind, tmp_path)
    images = [rgb(0, (30, 30)), rgb(1, (30, 60)), rgb(2, (30, 30))]  # H x W: square, wide, square
    batch = encoder.encode(images)
    for image, features in zip(images, batch):
        torch.testing.assert_close(features, encoder.encode([image])[0], atol=1e-5, rtol=1e-5)
    assert batch[1].shape[0] > batch[0].shape[0] == batch[2].shape[0]  # the wide image: more patches
    # image_size turns resizing on whatever the file says: one size again
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**settings, "do_resize": False}))
    fixed = build_encoder(kind, tmp_path, image_size=2 * config.patch_size)
    with_cls = length - (config.image_size // config.patch_size) ** 2
    assert {tuple(f.shape) for f in fixed.encode(images)} == {(2 * 2 + with_cls, 32)}


def test_processor_settings_nested_in_transformers_5s_processor_file_are_read(tmp_path):
    """transformers 5's ProcessorMixin.save_pretrained writes only processor_config.json, the image processor's or
    feature extractor's settings nested in it: the encoders used the model's defaults instead (CLIP's mean and std;
    WavLM's normalised samples, where Base and Base+ read raw ones). Such a folder's store is keyed apart from the
    stores its items were encoded into before."""
    import json

    from preprocessing.cache.key import store_key
    from preprocessing.storage import Fingerprints
    from tests.tiny_models import save_tiny_clip, save_tiny_wavlm

    save_tiny_clip(tmp_path / "clip")
    save_tiny_wavlm(tmp_path / "wavlm")
    # transformers 4's processor_config.json: the processor's own options, no image processor's: the defaults
    (tmp_path / "clip" / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor"}))
    assert list(build_inputs("clip", tmp_path / "clip").processor.image_mean) != [0.5] * 3
    key = store_key("image", {"kind": "clip", "model_dir": str(tmp_path / "clip"), "dtype": "fp32",
                              "image_size": None}, {}, Fingerprints(str(tmp_path / "fp")))
    assert "processor_file" not in key
    processor = build_inputs("clip", tmp_path / "clip").processor.to_dict()
    nested = {"image_processor": {**processor, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}}
    (tmp_path / "clip" / "processor_config.json").write_text(json.dumps(nested))
    assert list(build_inputs("clip", tmp_path / "clip").processor.image_mean) == [0.5] * 3
    (tmp_path / "wavlm" / "processor_config.json").write_text(json.dumps(
        {"feature_extractor": {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": False}}))
    assert build_inputs("wavlm", tmp_path / "wavlm").features.do_normalize is False
    nested_key = store_key("image", {"kind": "clip", "model_dir": str(tmp_path / "clip"), "dtype": "fp32",
                                     "image_size": None}, {}, Fingerprints(str(tmp_path / "fp")))
    assert nested_key["processor_file"] == "processor_config.json"


def test_missing_model_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_encoder("clip", tmp_path)
    with pytest.raises(ValueError, match="unknown encoder 'vit'"):
        build_encoder("vit", tmp_path)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    WhisperModel(WHISPER).save_pretrained(path)
    return path


def tone(seconds, rate, channels=1, hz=440) -> Audio:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * hz * t).astype(np.float32)
    return Audio(np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)


def test_whisper_trims_to_the_real_length_and_resamples(whisper_dir):
    encoder = build_encoder("whisper", whisper_dir)
    one_s, half_s_8k_stereo = encoder.encode([tone(1.0, 16000), tone(0.5, 8000, channels=2)])
    assert one_s.shape == (50, 32) and half_s_8k_stereo.shape == (25, 32)
    with pytest.raises(ValueError, match="sample clip-9: sample rate 100 Hz"):
        encoder.encode([tone(1.0, 100)], ["clip-9"])
    bad = tone(0.2, 16000)
    bad.wave[3] = np.nan
    with pytest.raises(ValueError, match="sample n1: the waveform has NaN"):
        encoder.encode([bad], ["n1"])


def test_whisper_reads_a_clip_over_30_s_as_consecutive_windows(whisper_dir):
    """LibriSpeech's test sets hold clips of up to 35 s: refused, they left the test score (they were rejected
    before 2026-12-06). Each 30 s window is encoded as a clip of its own; the features are joined in time."""
    encoder = build_encoder("whisper", whisper_dir)
    rng = np.random.default_rng(0)
    clip = Audio((0.1 * rng.standard_normal(16000 * 61 + 320)).astype(np.float32), 16000)  # 61.02 s: 3 windows
    short = tone(0.5, 16000)
    features, alone = encoder.encode([clip, short])
    assert features.shape == (1500 + 1500 + 51, 32)  # 30 s, 30 s, 1.02 s at 50 Hz
    window = 30 * 16000
    for start, rows in ((0, slice(0, 1500)), (window, slice(1500, 3000)), (2 * window, slice(3000, None))):
        part = Audio(clip.wave[start : start + window], 16000)
        torch.testing.assert_close(features[rows], encoder.encode([part])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, encoder.encode([short])[0])  # its batch-mate's windows change nothing


def test_integer_pcm_is_scaled_and_channels_first_is_refused():
    """int16 samples went in unscaled (a peak of 9830 for 0.3), and a [channels, samples] array was read as a clip
    of two samples with a channel per sample."""
    from preprocessing.items import to_16k_mono

    floats = tone(0.1, 16000).wave
    pcm = np.round(floats * 32768).astype(np.int16)
    np.testing.assert_allclose(to_16k_mono(Audio(pcm, 16000), "pcm"), floats, atol=1e-4)
    eight_bit = np.round(floats * 128 + 128).astype(np.uint8)  # 8-bit WAV: unsigned, silence at 128
    np.testing.assert_allclose(to_16k_mono(Audio(eight_bit, 16000), "u8"), floats, atol=1e-2)
    assert to_16k_mono(Audio([0, 1, -1], 16000), "list").tolist() == [0.0, 1.0, -1.0]  # numbers, not PCM
    with pytest.raises(ValueError, match=r"sample s: a \(2, 1600\) waveform has 1600 channels; give it as \[samples"):
        to_16k_mono(Audio(np.stack([floats, floats]), 16000), "s")
    # a rate read from metadata as a float (a TypeError from math.gcd stopped its whole batch)
    assert to_16k_mono(Audio(floats, np.float64(22050.0)), "f").shape == to_16k_mono(Audio(floats, 22050), "i").shape
    for rate in (22050.5, "16000", True, float("inf"), float("nan")):  # inf: an OverflowError no caller caught
        with pytest.raises(ValueError, match=f"sample r: the sample rate must be a whole number of Hz, got {rate!r}"):
            to_16k_mono(Audio(floats, rate), "r")
    # int16 PCM in a torch tensor (as torchaudio-style loaders hand it over) is scaled as the array is
    np.testing.assert_allclose(to_16k_mono(Audio(torch.from_numpy(pcm), 16000), "tensor"), floats, atol=1e-4)


@pytest.mark.parametrize("max_padding", [0.0, 0.2, float("inf")])  # each length alone, two pairs, all
@pytest.mark.parametrize("norm", ["group", "layer"])  # WavLM Base/Base+, WavLM Large
def test_wavlm_gives_50_hz_features_whatever_its_batch_mates(tmp_path, norm, max_padding):
    torch.manual_seed(0)
    WavLMModel(WavLMConfig(**{**WAVLM.to_dict(), "feat_extract_norm": norm})).save_pretrained(tmp_path)
    encoder = build_encoder("wavlm", tmp_path)
    encoder.max_padding = max_padding
    clips = [tone(1.0, 16000), tone(0.5, 22050), tone(0.7, 16000), tone(0.7, 16000, hz=220)]
    features = encoder.encode(clips)
    assert [f.shape for f in features] == [(49, 32), (24, 32), (34, 32), (34, 32)]
    for clip, f in zip(clips, features):  # each as HF's model gives it for the clip alone
        wave = torch.from_numpy(encoder.inputs.prepare(clip, "clip")["wave"])[None]
        torch.testing.assert_close(f, encoder.model(wave).last_hidden_state[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sample e: expected a non-empty"):
        encoder.encode([Audio(np.zeros(0, np.float32), 16000)], ["e"])


def test_wavlm_reads_the_samples_its_checkpoint_expects(tmp_path):
    """Base and Base+ ship a feature extractor that does not normalise; one frame is 400 samples (25 ms)."""
    torch.manual_seed(0)
    WavLMModel(WAVLM).save_pretrained(tmp_path)
    clip = tone(0.5, 16000)
    normalised = build_encoder("wavlm", tmp_path).inputs.prepare(clip, "c")["wave"]
    assert abs(normalised.std() - 1) < 1e-3  # no processor settings shipped: normalised, as before
    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path)
    encoder = build_encoder("wavlm", tmp_path)
    raw = encoder.inputs.prepare(clip, "c")["wave"]
    np.testing.assert_array_equal(raw, clip.wave)
    alone = encoder.model(torch.from_numpy(raw)[None]).last_hidden_state[0]
    torch.testing.assert_close(encoder.encode([clip])[0], alone)
    assert encoder.inputs.min_samples == 400 and encoder.encode([tone(400 / 16000, 16000)])[0].shape == (1, 32)
    with pytest.raises(ValueError, match="sample short: 399 samples at 16 kHz, fewer than the 400 of one feature"):
        encoder.encode([tone(399 / 16000, 16000)], ["short"])


def test_clips_batch_with_others_of_about_their_length():
    lengths = [10, 100, 95, 12, 50, 95]
    assert length_groups(lengths, 0.0) == [[1], [2, 5], [4], [3], [0]]  # equal lengths only
    # longest first; a group takes the next clip while padding to its longest adds at most 25 % of its frames
    assert length_groups(lengths, 0.25) == [[1, 2, 5, 4], [3, 0]]
    assert length_groups(lengths, float("inf")) == [[1, 2, 5, 4, 3, 0]]


def test_every_registered_encoder_is_called_the_same_way(tmp_path):
    """One loop over the registry: `encode(items, ids)` for every kind, audio items carrying their own rate."""
    items = {"image": (rgb(0), rgb(1, (25, 60))), "audio": (tone(1.0, 8000), tone(0.5, 16000, channels=2)),
             "series": (seasonal(40), seasonal(21, seed=1))}
    bad = {"image": rgb(0).convert("L"), "audio": tone(0.5, 16000).wave, "series": np.zeros((40, 2), np.float32)}
    refusal = {"image": "expected an RGB image", "audio": r"expected an Audio\(wave, rate\) item",
               "series": "expected a univariate series"}
    modality = {**dict.fromkeys(VISION, "image"), "whisper": "audio", "wavlm": "audio", "timer": "series",
                "fracast": "series"}
    assert sorted(TINY_MODELS) == sorted(modality) == sorted(ENCODERS)  # a new encoder joins this loop
    for kind, save in TINY_MODELS.items():
        torch.manual_seed(0)
        save(tmp_path / kind)
        encoder, m = build_encoder(kind, tmp_path / kind), modality[kind]
        first, second = encoder.encode(list(items[m]), ["first", "second"])
        assert first.ndim == second.ndim == 2 and first.shape[1] == second.shape[1] == encoder.output_dim, kind
        if m == "audio":  # 1 s at 8 kHz resampled to 16 kHz: 1 s of 50 Hz features, twice the 0.5 s clip's
            assert abs(first.shape[0] - 2 * second.shape[0]) <= 1 and first.shape[0] >= 49, kind
        with pytest.raises(ValueError, match=f"sample second: {refusal[m]}"):
            encoder.encode([items[m][0], bad[m]], ["first", "second"])
        with pytest.raises(ValueError, match="2 items but 1 sample ids"):
            encoder.encode(list(items[m]), ["first"])


def test_the_host_half_prepares_without_the_weights_and_a_batch_equals_its_items_alone(tmp_path):
    """What the encode job's decode tasks run: `build_inputs` reads the configs only (the weights file is gone)
    and survives pickling (Ray ships it); its arrays are the encoder's own; and `forward` of a batch padded with
    items of other lengths gives each item the features it gets alone (padding never leaks in)."""
    items = {"image": [rgb(0), rgb(1, (25, 60)), np.asarray(rgb(2, (3, 50)))],
             "audio": [tone(1.0, 8000), tone(0.5, 16000, channels=2), tone(0.3, 16000)],
             "series": [seasonal(40), seasonal(21, seed=1), seasonal(64, seed=2)]}
    modality = {**dict.fromkeys(VISION, "image"), "whisper": "audio", "wavlm": "audio", "timer": "series",
                "fracast": "series"}
    # a setting the inputs must take from the caller, not the folder, and one only the model reads
    settings = {"clip": {"image_size": 40, "layer": -2}}
    for kind, save in TINY_MODELS.items():
        torch.manual_seed(0)
        save(tmp_path / kind)
        encoder = build_encoder(kind, tmp_path / kind, **settings.get(kind, {}))
        configs_only = tmp_path / f"{kind}-configs"
        configs_only.mkdir()
        for json_file in (tmp_path / kind).glob("*.json"):
            (configs_only / json_file.name).write_bytes(json_file.read_bytes())
        built = build_inputs(kind, configs_only, **settings.get(kind, {}))
        assert pickle.dumps(built)  # what Ray does to hand it to the decode tasks
        inputs = copy.deepcopy(built)  # a copy made through the same reduce protocol
        ids = [f"{kind}-{i}" for i in range(3)]
        prepared = [inputs.prepare(item, sid) for item, sid in zip(items[modality[kind]], ids)]
        own = [encoder.inputs.prepare(item, sid) for item, sid in zip(items[modality[kind]], ids)]
        for mine, theirs in zip(prepared, own):
            assert mine.keys() == theirs.keys() and all(isinstance(a, np.ndarray) for a in mine.values()), kind
            assert all(np.array_equal(mine[name], theirs[name]) for name in mine), kind
        batched = encoder.forward(prepared)
        for p, f in zip(prepared, batched):
            torch.testing.assert_close(f, encoder.forward([p])[0], atol=1e-5, rtol=1e-5, msg=kind)
        assert len({f.shape[0] for f in batched}) > 1 or modality[kind] == "image", kind  # lengths did differ
    with pytest.raises(ValueError, match="unknown encoder 'vit'"):
        build_inputs("vit", tmp_path)


@pytest.mark.parametrize("kind", ["dinov2", "siglip2"])
def test_a_chosen_layer_gives_that_hidden_state(tmp_path, kind):
    model_class, config, _ = VISION[kind]
    torch.manual_seed(0)
    model_class(config.__class__(**{**config.to_dict(), "num_hidden_layers": 2})).save_pretrained(tmp_path)
    images, ids = [rgb(0), rgb(1)], ["a", "b"]
    last = build_encoder(kind, tmp_path).encode(images, ids)
    embeddings = build_encoder(kind, tmp_path, layer=0).encode(images, ids)
    encoder = build_encoder(kind, tmp_path, layer=-2)
    inputs = encoder.inputs.processor(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = encoder.model(**inputs, output_hidden_states=True).hidden_states[-2]
    chosen = encoder.encode(images, ids)
    for i, f in enumerate(chosen):  # SigLIP2 keeps each image's real patches only
        torch.testing.assert_close(f, expected[i, : len(f)])
        assert f.shape == last[i].shape == embeddings[i].shape and not torch.allclose(f, last[i])
    with pytest.raises(ValueError, match="layer 3 is not one of the model's hidden states"):
        build_encoder(kind, tmp_path, layer=3)


def test_inference_builds_the_encoder_the_model_was_trained_with(tmp_path, capsys):
    model_class, config, _ = VISION["dinov2"]
    torch.manual_seed(0)
    model_class(config.__class__(**{**config.to_dict(), "num_hidden_layers": 2})).save_pretrained(tmp_path / "enc")
    torch.manual_seed(1)
    model_class(config.__class__(**{**config.to_dict(), "num_hidden_layers": 2})).save_pretrained(tmp_path / "other")
    trained = build_encoder("dinov2", tmp_path / "enc", image_size=56, layer=1)
    (tmp_path / "model").mkdir()
    write_records(tmp_path / "model", encoders={"image": {
        "kind": "dinov2", "dtype": "fp32", "image_size": 56, "layer": 1, "weights_hash": trained.weights_hash(),
        "revision": 2, "limits": {"max_image_pixels": 1}}})
    assert read_encoders_record(tmp_path / "model")["image"]["layer"] == 1
    rebuilt = encoder_for(tmp_path / "model", "image", tmp_path / "enc")
    # as the caches hold them: in fp16
    torch.testing.assert_close(rebuilt.encode([rgb(0)], ["a"])[0], trained.encode([rgb(0)], ["a"])[0].half().float())
    assert rebuilt.encode([rgb(0)], ["a"])[0].shape[0] == 4 * 4 + 1  # 56 px: a 4 x 4 patch grid, not the default 2 x 2
    with pytest.raises(ValueError, match="not the dinov2 weights .* was trained with"):
        encoder_for(tmp_path / "model", "image", tmp_path / "other")
    with pytest.raises(ValueError, match="was trained on dinov2 image features, not clip"):
        encoder_for(tmp_path / "model", "image", tmp_path / "enc", kind="clip")
    with pytest.raises(ValueError, match="does not record its image encoder"):
        encoder_for(tmp_path / "enc", "image", tmp_path / "enc")
    unrecorded = encoder_for(tmp_path / "enc", "image", tmp_path / "enc", kind="dinov2")  # a model saved by hand
    assert unrecorded.encode([rgb(0)], ["a"])[0].shape[0] == 2 * 2 + 1
    # trained on caches of two image sizes: the recorded layer and weights, the encoder's default size, a note
    write_records(tmp_path / "model", encoders={"image": {
        "kind": "dinov2", "layer": 1, "weights_hash": trained.weights_hash(), "revision": 2,
        "differing": ["image_size"]}})
    mixed = encoder_for(tmp_path / "model", "image", tmp_path / "enc")
    assert "of different image_size; " in capsys.readouterr().err
    assert mixed.encode([rgb(0)], ["a"])[0].shape[0] == 2 * 2 + 1 and mixed.encoder.layer == 1
    with pytest.raises(ValueError, match="not the dinov2 weights .* was trained with"):
        encoder_for(tmp_path / "model", "image", tmp_path / "other")


def test_inference_reads_the_features_training_read(tmp_path, capsys):
    """The recorded dtype and storage precision are honoured (bf16 encodes, int8 caches: inference encoded in fp32
    and read unrounded features), and features our code has changed since the model trained are refused."""
    from preprocessing.cache.precision import from_stored, to_stored
    from preprocessing.encoders.recorded import check_revision

    model_class, config, _ = VISION["dinov2"]
    model_class(config.__class__(**{**config.to_dict(), "num_hidden_layers": 2})).save_pretrained(tmp_path / "enc")
    record = {"kind": "dinov2", "dtype": "bf16", "image_size": 56, "layer": 1,
              "weights_hash": hash_model_dir(tmp_path / "enc"), "precision": "int8", "revision": 2}
    (tmp_path / "model").mkdir()
    write_records(tmp_path / "model", encoders={"image": record})
    rebuilt = encoder_for(tmp_path / "model", "image", tmp_path / "enc")
    assert rebuilt.dtype == torch.bfloat16
    as_encoded = build_encoder("dinov2", tmp_path / "enc", dtype=torch.bfloat16, image_size=56, layer=1)
    expected = from_stored(to_stored(as_encoded.encode([rgb(0)], ["a"])[0].numpy(), "int8"), "int8")
    torch.testing.assert_close(rebuilt.encode([rgb(0)], ["a"])[0], torch.from_numpy(expected))

    audio = {"kind": "wavlm", "dtype": "fp32", "image_size": None, "layer": None, "weights_hash": "ab" * 32}
    write_records(tmp_path / "model", encoders={"audio": {**audio, "revision": 2}})
    with pytest.raises(ValueError, match="trained on revision 2 of the wavlm features, and this code makes revision 3"):
        encoder_for(tmp_path / "model", "audio", tmp_path / "enc")
    check_revision(tmp_path / "model", {**audio, "revision": 3})
    check_revision(tmp_path / "model", {**audio, "kind": "whisper", "revision": None})  # a kind never revised
    with pytest.raises(ValueError, match="revision 1 of the dinov2 features, and this code makes revision 2"):
        check_revision(tmp_path / "model", {**record, "revision": None})
    check_revision(tmp_path / "model", audio)  # recorded before revisions were: let through, with a note
    assert "does not record one revision of the wavlm features" in capsys.readouterr().err
    check_revision(tmp_path / "model", {**audio, "revision": None, "differing": ["revision"]})  # caches of several
    assert "does not record one revision of the wavlm features" in capsys.readouterr().err


def test_inference_refuses_features_the_caches_could_not_hold():
    """The encode job rejects an item whose features overflow the store's fp16; inference answered from inf."""
    import copy

    from preprocessing.encoders.recorded import AsStored

    class Loud:
        kind = "loud"

        def encode(self, items, ids):
            return [torch.full((2, 4), 1e6) for _ in items]

    encoder = AsStored(Loud(), "fp16")
    with pytest.raises(ValueError, match="sample photo-3: the encoder's features hold NaN or inf, or values past fp16"):
        encoder.encode([None], ["photo-3"])
    assert copy.copy(encoder).kind == "loud"  # the wrapper's own attributes first: a copy does not recurse


def test_a_series_is_cut_to_the_window_length_the_model_trained_on(tmp_path):
    """A whole history z-scored at once is another input than the windows training read: its last `lookback`
    values are; fewer are refused."""
    from preprocessing.encoders.recorded import MediaEncoders

    write_records(tmp_path, encoders={"series": {"kind": "raw", "lookback": 16, "revision": 2}})
    history = np.sin(np.arange(40) / 3) + 0.1 * np.arange(40)
    media = MediaEncoders(tmp_path, {})
    cut, last = media.series(history, "long"), media.series(history[-16:], "last")
    assert cut.features.shape == (16, 1)
    assert torch.equal(cut.features, last.features) and (cut.mean, cut.std) == (last.mean, last.std)
    with pytest.raises(ValueError, match="short: 10 values, fewer than the 16 of the windows the model was trained"):
        media.series(history[:10], "short")
    write_records(tmp_path, encoders={"series": {"kind": "raw", "revision": 2}})  # no lookback: taken as given
    assert MediaEncoders(tmp_path, {}).series(history, "long").features.shape == (40, 1)
    write_records(tmp_path, encoders={"series": {"kind": "raw"}})  # revision 1, no encoder to check it: still refused
    with pytest.raises(ValueError, match="trained on revision 1 of the raw features, and this code makes revision 2"):
        MediaEncoders(tmp_path, {}).series(history, "long")


@pytest.mark.parametrize("kind", sorted(VISION))
def test_tiny_images_encode_as_their_pil_form_on_the_encode_jobs_path(tmp_path, kind):
    """The encode job hands encoders decoded H x W x 3 arrays; an image 3 pixels high or less must not be read as
    channels-first (transformers guesses the layout from the shape): each gives the features of its PIL form, and
    a uniform colour at any size those of the same colour at 16 x 16 where the input size is fixed."""
    from pipelines.encode import ItemEncoder
    from pipelines.encode_config import EncoderSpec
    from preprocessing.validate import Limits, decode_image

    model_class, config, length = VISION[kind]
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path)
    store = FeatureStore(str(tmp_path / "cache"), "unkeyed")  # no store key: no weights to check against
    encoder = ItemEncoder(EncoderSpec(kind=kind, model_dir=str(tmp_path)), store).encoder
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (1, 3), (3, 1), (3, 250), (2, 2)):
        pil = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        png = io.BytesIO()
        pil.save(png, format="PNG")
        decoded = decode_image(png.getvalue(), Limits())  # what the job's readers hand the encoder
        assert decoded.shape == (height, width, 3)
        from_array, from_pil = encoder.encode([decoded, pil], ["array", "pil"])
        torch.testing.assert_close(from_array, from_pil, msg=f"{kind} {height}x{width}")
        if length is not None:
            red, red_16 = encoder.encode([np.full((height, width, 3), (255, 0, 0), np.uint8),
                                          np.full((16, 16, 3), (255, 0, 0), np.uint8)], ["red", "red-16"])
            torch.testing.assert_close(red, red_16, atol=1e-4, rtol=1e-4, msg=f"{kind} {height}x{width}")


def test_the_encode_job_builds_the_layer_its_config_names_the_embeddings_too(tmp_path):
    from pipelines.encode import ItemEncoder
    from pipelines.encode_config import EncoderSpec

    model_class, config, _ = VISION["dinov2"]
    model_class(config.__class__(**{**config.to_dict(), "num_hidden_layers": 2})).save_pretrained(tmp_path)
    for layer in (0, 1, None):  # 0, the embeddings, is a layer like any other
        spec = EncoderSpec(kind="dinov2", model_dir=str(tmp_path), image_size=28, layer=layer)
        assert ItemEncoder(spec, FeatureStore(str(tmp_path / "cache"), "unkeyed")).encoder.layer == layer
