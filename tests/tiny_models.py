"""Tiny encoders saved to a directory, loaded back through the same local-path code as real weights."""

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, WavLMConfig, WavLMModel, WhisperConfig, WhisperModel


def save_tiny_clip(path, hidden: int = 32, image_size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=hidden, intermediate_size=2 * hidden,
                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(path)
    return path


def save_tiny_whisper(path, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    WhisperModel(WhisperConfig(d_model=hidden, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=2 * hidden,
                               decoder_ffn_dim=2 * hidden)).save_pretrained(path)
    return path


def save_tiny_wavlm(path, hidden: int = 32, seed: int = 0):
    """WavLM Base's convolutions (one feature frame reads 400 samples) under one small transformer layer."""
    torch.manual_seed(seed)
    WavLMModel(WavLMConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden,
                           conv_dim=(hidden,) * 7, num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=2)).save_pretrained(path)
    return path


def tiny_digits_cache(root, split: str, n: int, shard_size: int) -> str:
    """`n` digits of one split, encoded by a tiny CLIP into a cache under `root`."""
    from pipelines.config import from_dict
    from pipelines.encode import EncodeConfig, run_encode
    from preprocessing.demo_data import build_digits

    build_digits(root / "digits", n_train=n if split == "train" else 0, n_test=n if split == "test" else 0)
    save_tiny_clip(root / "clip")
    return run_encode(from_dict(EncodeConfig, {
        "dataset": {"format": "llava", "path": str(root / "digits" / f"{split}.json")},
        "encoder": {"kind": "clip", "model_dir": str(root / "clip")},
        "cache": {"root": str(root / "cache"), "shard_size": shard_size}})).uri
