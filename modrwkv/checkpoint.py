"""Checkpoint I/O for the backbone: RWKV-LM `.pth`, HF-style directories, and flash-linear-attention's layout.

Every loader is strict: missing keys, unexpected keys and shape mismatches are collected and raised together
in one `CheckpointError` that names the file. Nothing is unpickled (`weights_only=True`, safetensors).
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import RWKV7Config
from .model import RWKV7

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


def load_rwkv_pth(path, dtype=torch.float32) -> RWKV7:
    weights = read_rwkv_pth(path)
    model = RWKV7(infer_config(weights, path))
    load_state_strict(model, weights, path, optional=UNUSED_LAYER0)
    return model.to(dtype).eval()


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors: what safetensors writes (weights may be stored transposed in memory)."""
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_pretrained(model: RWKV7, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE)
    save_file(cpu_state_dict(model), directory / WEIGHTS_FILE)


def load_pretrained(directory, dtype=None) -> RWKV7:
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: no {name}; expected a directory written by save_pretrained")
    try:
        config = RWKV7Config.load(directory / CONFIG_FILE)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid config ({e})") from e
    try:
        weights = load_file(directory / WEIGHTS_FILE)
    except Exception as e:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: not a readable safetensors file ({e})") from e
    model = RWKV7(config)
    load_state_strict(model, weights, directory / WEIGHTS_FILE)
    return model.to(dtype or weights["emb.weight"].dtype).eval()  # default: the dtype it was saved in


# ---- flash-linear-attention's HF layout -------------------------------------------------------------------
# RWKV-LM name part -> fla name part. LoRA triples x0/x1/x2 become x_lora.lora.{2.bias, 0.weight, 2.weight},
# with the matrices transposed (fla stores them as nn.Linear weights). fla keeps [1,1,C] only for att.x_*.
_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
        "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_PART = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_LORA = {"0": "2.bias", "1": "0.weight", "2": "2.weight"}


def rwkv_key_to_fla(name: str) -> tuple[str, bool]:
    """(fla name, transposed?) for one RWKV-LM key."""
    if name in _TOP:
        return _TOP[name], False
    _, layer, part, *rest = name.split(".")
    rest = ".".join(rest)
    transposed = False
    if part == "att" and re.fullmatch(r"[wavg][012]", rest):
        transposed = rest[1] in "12"
        rest = f"{rest[0]}_lora.lora.{_LORA[rest[1]]}"
    elif part == "att" and rest.split(".")[0] in _PROJ:
        head, *tail = rest.split(".")
        rest = ".".join([_PROJ[head], *tail])
    return f"model.layers.{layer}.{_PART[part]}.{rest}", transposed


def rwkv_to_fla(weights: dict[str, torch.Tensor], config: RWKV7Config) -> tuple[dict[str, torch.Tensor], dict]:
    out = {}
    for name, tensor in weights.items():
        if name in UNUSED_LAYER0:
            continue
        fla_name, transposed = rwkv_key_to_fla(name)
        t = tensor.t() if transposed else tensor
        if t.dim() == 3 and t.shape[:2] == (1, 1) and ".attn.x_" not in fla_name:
            t = t.reshape(-1)
        out[fla_name] = t.contiguous()
    hf_config = {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "head_dim": config.head_size,
        "intermediate_size": config.dim_ffn,
        "hidden_ratio": config.dim_ffn / config.n_embd,
        "decay_low_rank_dim": config.decay_lora,
        "a_low_rank_dim": config.a_lora,
        "v_low_rank_dim": config.v_lora,
        "gate_low_rank_dim": config.gate_lora,
        "norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    return out, hf_config


def fla_to_rwkv(weights: dict[str, torch.Tensor], hf_config: dict) -> tuple[dict[str, torch.Tensor], RWKV7Config]:
    config = RWKV7Config(
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["num_hidden_layers"],
        n_embd=hf_config["hidden_size"],
        head_size=hf_config.get("head_dim") or 64,
        dim_ffn=hf_config.get("intermediate_size") or int(hf_config["hidden_size"] * hf_config.get("hidden_ratio", 4)),
        decay_lora=hf_config["decay_low_rank_dim"],
        a_lora=hf_config["a_low_rank_dim"],
        v_lora=hf_config["v_low_rank_dim"],
        gate_lora=hf_config["gate_low_rank_dim"],
    )
    template = RWKV7(config).state_dict()
    names = {rwkv_key_to_fla(k)[0]: k for k in template}
    out, unexpected = {}, []
    for fla_name, tensor in weights.items():
        if fla_name not in names:
            unexpected.append(fla_name)
            continue
        name = names[fla_name]
        t = tensor.t() if rwkv_key_to_fla(name)[1] else tensor
        out[name] = t.reshape(template[name].shape).contiguous() if t.numel() == template[name].numel() else t
    if unexpected:
        raise CheckpointError(f"fla checkpoint has keys with no RWKV-LM counterpart: {', '.join(unexpected)}")
    return out, config


def convert_rwkv_pth_to_fla(src, out_dir) -> None:
    weights = read_rwkv_pth(src)
    config = infer_config(weights, src)
    fla_weights, hf_config = rwkv_to_fla(weights, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(fla_weights, out_dir / WEIGHTS_FILE)


def convert_fla_to_rwkv_pth(src_dir, out_path) -> None:
    src_dir = Path(src_dir)
    hf_config = json.loads((src_dir / CONFIG_FILE).read_text())
    weights, config = fla_to_rwkv(load_file(src_dir / WEIGHTS_FILE), hf_config)
    model = RWKV7(config)
    load_state_strict(model, weights, src_dir / WEIGHTS_FILE, optional=UNUSED_LAYER0)
    torch.save(weights, out_path)
