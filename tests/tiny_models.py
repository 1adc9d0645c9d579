"""Tiny encoders saved to a directory, loaded back through the same local-path code as real weights."""

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, WhisperConfig, WhisperModel


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
