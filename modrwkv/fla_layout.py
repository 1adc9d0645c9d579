"""flash-linear-attention's HF layout of RWKV-7 (`fla-hub/rwkv7-*`), to and from RWKV-LM's `.pth`: key names,
LoRA matrices transposed, [1, 1, C] vectors flattened. Conversions are checked against the model strictly."""

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import (CONFIG_FILE, UNUSED_LAYER0, WEIGHTS_FILE, CheckpointError, infer_config, load_state_strict,
                         read_rwkv_pth, write_safetensors)
from .config import RWKV7Config
from .model import RWKV7

# RWKV-LM name part -> fla name part. LoRA triples x0/x1/x2 become x_lora.lora.{2.bias, 0.weight, 2.weight},
# with the matrices transposed (fla stores them as nn.Linear weights). fla keeps [1,1,C] only for att.x_*.
ARCHITECTURE = "RWKV7ForCausalLM"  # fla's class for the layout, as its config.json names it
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
        "architectures": [ARCHITECTURE],
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
    for name in UNUSED_LAYER0:  # fla has no layer-0 value LoRA; RWKV-LM's trainer loads strictly and wants them
        out.setdefault(name, torch.zeros_like(template[name]))
    return out, config


def convert_rwkv_pth_to_fla(src, out_dir) -> None:
    weights = read_rwkv_pth(src)
    write_fla_folder(weights, infer_config(weights, src), out_dir)


def write_fla_folder(weights: dict[str, torch.Tensor], config: RWKV7Config, out_dir) -> None:
    """A backbone's RWKV-LM-named weights, written in fla's layout: config.json and model.safetensors. fla's ln_x
    (g_norm) takes eps = head_dim x norm_eps, RWKV-7's is 64e-5 at any head size: equal at 64 only (one norm_eps
    also sets the LayerNorms' 1e-5, so no config makes both right); other head sizes are written with a warning."""
    if config.head_size != 64:
        warnings.warn(f"head size {config.head_size}: fla computes ln_x with eps {config.head_size * 1e-5:g}, this "
                      "backbone was trained with 64e-5; its outputs in fla will differ slightly", stacklevel=2)
    fla_weights, hf_config = rwkv_to_fla(weights, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    write_safetensors(fla_weights, out_dir / WEIGHTS_FILE)


def convert_fla_to_rwkv_pth(src_dir, out_path) -> None:
    src_dir = Path(src_dir)
    hf_config = json.loads((src_dir / CONFIG_FILE).read_text())
    weights, config = fla_to_rwkv(load_file(src_dir / WEIGHTS_FILE), hf_config)
    model = RWKV7(config)
    load_state_strict(model, weights, src_dir / WEIGHTS_FILE, optional=UNUSED_LAYER0)
    torch.save(weights, out_path)
