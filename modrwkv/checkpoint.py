"""Checkpoint I/O for the backbone, at the level of weight dicts: RWKV-LM `.pth`, HF-style directories, and
flash-linear-attention's layout. `RWKV7.from_pretrained` builds the model from what these read.

Every loader is strict: missing keys, unexpected keys and shape mismatches are collected and raised together
in one `CheckpointError` that names the file. Nothing is unpickled (`weights_only=True`, safetensors).
"""

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import RWKV7Config
from .inference import quantized_layers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Present in some RWKV-LM checkpoints, never used: layer 0 has no value residual.
UNUSED_LAYER0 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


class CheckpointError(ValueError):
    pass


def read_rwkv_pth(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for truncated/garbage/pickled-code files
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (an RWKV-LM state dict), got {type(weights).__name__}")
    return weights


def infer_config(weights: dict[str, torch.Tensor], source) -> RWKV7Config:
    """Sizes from shapes: vocab and width from emb, heads from r_k, layers from block indices, LoRA ranks."""
    required = ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1",
                "blocks.0.att.a1", "blocks.0.att.g1")
    missing = [k for k in required if k not in weights]
    if missing:
        raise CheckpointError(f"{source}: not an RWKV-7 (x070) checkpoint; missing keys: {', '.join(missing)}")
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))}
    vocab, n_embd = weights["emb.weight"].shape
    n_head, head_size = weights["blocks.0.att.r_k"].shape
    v1 = weights.get("blocks.1.att.v1", weights.get("blocks.0.att.v1"))
    return RWKV7Config(
        vocab_size=vocab,
        n_layer=max(layers) + 1,
        n_embd=n_embd,
        head_size=head_size,
        dim_ffn=weights["blocks.0.ffn.key.weight"].shape[0],
        decay_lora=weights["blocks.0.att.w1"].shape[1],
        a_lora=weights["blocks.0.att.a1"].shape[1],
        v_lora=v1.shape[1] if v1 is not None else 0,
        gate_lora=weights["blocks.0.att.g1"].shape[1],
    )


def load_state_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], source, optional=()) -> None:
    """Copy `weights` into `model`, or raise one error listing every missing/unexpected/mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights and k not in optional]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in weights and weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items))
        raise CheckpointError(f"{source}: checkpoint does not match the model; " + "; ".join(parts))
    model.load_state_dict(weights, strict=False)


def refuse_quantized(module: torch.nn.Module) -> None:
    """A quantized model is refused: its int8 weights and scales are no checkpoint format any loader reads, and
    dequantizing would pass rounded weights off as the trained ones."""
    if quantized := quantized_layers(module):
        raise CheckpointError(f"the model is quantized for inference ({len(quantized)} layers, e.g. {quantized[0]}) "
                              "and cannot be saved: save it before modrwkv.quantize(), or load the checkpoint again")


def cpu_state_dict(module: torch.nn.Module, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """The tensors named as `keep` accepts, as detached, contiguous CPU tensors: what safetensors writes (weights may
    be stored transposed in memory). A quantized model is refused (`refuse_quantized`)."""
    refuse_quantized(module)
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items() if keep(k)}


def write_pretrained(config: RWKV7Config, weights: dict[str, torch.Tensor], directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / CONFIG_FILE)
    write_safetensors(weights, directory / WEIGHTS_FILE)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """A safetensors file written whole or not at all: under a temporary name, then renamed. A save cut short (Ctrl-C,
    a full disk) left a truncated file that the next start took for a saved model."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def read_pretrained(directory) -> tuple[RWKV7Config, dict[str, torch.Tensor]]:
    """(config, weights) of a directory written by `write_pretrained`."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: no {name}; expected a directory written by save_pretrained")
    try:
        config = RWKV7Config.load(directory / CONFIG_FILE)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid config ({e})") from e
    return config, read_safetensors(directory / WEIGHTS_FILE)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; CheckpointError naming the file when it does not read (truncated, not one)."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def read_config(path) -> RWKV7Config:
    """The config of a backbone checkpoint (a save_pretrained directory or an RWKV-LM .pth), weights unread
    where the format allows."""
    path = Path(path)
    if path.is_dir():
        return RWKV7Config.load(path / CONFIG_FILE)
    return infer_config(read_rwkv_pth(path), path)
