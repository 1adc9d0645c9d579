"""`modrwkv export`: a trained ModRWKV (opened from its `ModRWKV.save_pretrained` folder; an adapter-only one
completed with the backbone it records, wherever that is: `pipelines/trained_model.py`) written for other tools.

- `export_hf`: a folder `transformers` loads with trust_remote_code, no modrwkv package needed:
      config.json            ModRWKV's config, placeholder ids, encoders, auto_map (AutoConfig,
                             AutoModelForCausalLM, AutoTokenizer)
      model.safetensors      every weight, fp32, under ModRWKV's own names
      generation_config.json generation stops at <|endoftext|>
      tokenizer_config.json, rwkv_vocab_v20230424.txt   the World tokenizer
      *.py                   remote_code/'s files, and two modules of ours that are pure Python/torch already
                             (the tokenizer, WaveNet), shipped as they are rather than rewritten
- `export_fla`: the backbone alone in flash-linear-attention's RWKV-7 layout (`fla_layout.py`).
"""

import json
import shutil
from pathlib import Path


from .. import tokenizer as world_tokenizer
from .. import wavenet
from ..checkpoint import WEIGHTS_FILE, CheckpointError, cpu_state_dict, write_safetensors
from ..conversation import PLACEHOLDER_IDS, TURN_END
from ..fla_layout import ARCHITECTURE as FLA_ARCHITECTURE
from ..fla_layout import write_fla_folder
from ..model_folder import read_backbone_source, read_encoders_record
from ..multimodal import ModRWKV

REMOTE_CODE = Path(__file__).parent / "remote_code"
# export file name -> our module the remote code imports under that name: pure Python/torch already, so one
# source serves both (an import of ours added to either fails the test that loads an export without modrwkv)
SHIPPED_MODULES = {"world_tokenizer.py": Path(world_tokenizer.__file__), "wavenet.py": Path(wavenet.__file__)}
AUTO_MAP = {"AutoConfig": "configuration_modrwkv.ModRWKVConfig",
            "AutoModelForCausalLM": "modeling_modrwkv.ModRWKVForCausalLM",
            "AutoTokenizer": ["tokenization_modrwkv.ModRWKVTokenizer", None]}


ARCHITECTURES = {"hf": "ModRWKVForCausalLM", "fla": FLA_ARCHITECTURE}  # what each export's config.json names


def check_out_dir(model_dir, out_dir, target: str, backbone: str | None = None) -> None:
    """Refuses to write the export (`target`: hf or fla) over the folder it reads, over the backbone that folder
    records or the one given instead (`backbone`), or into a folder holding anything but an earlier export of the
    same kind: one file name, config.json or model.safetensors, would replace another model's."""
    out = Path(out_dir).resolve()
    if out == Path(model_dir).resolve():
        raise CheckpointError(f"{out_dir}: the export would overwrite the model folder it reads; give another folder")
    source = read_backbone_source(model_dir) or {}
    backbones = [Path(model_dir) / source["relative_path"]] if source.get("relative_path") else []
    backbones += [Path(path) for path in (source.get("path"), backbone) if path and "://" not in str(path)]
    if any(out == p.resolve() for p in backbones):
        raise CheckpointError(f"{out_dir}: the export would overwrite the backbone it reads; give another folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        architectures = json.loads((out / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        architectures = None
    if architectures != [ARCHITECTURES[target]]:
        raise CheckpointError(f"{out_dir}: holds other files than an earlier {target} export; give an empty or new "
                              "folder")


def export_hf(model: ModRWKV, model_dir, out_dir) -> Path:
    """The transformers folder (see the module's docstring) of `model`, opened from `model_dir`; returns it."""
    check_out_dir(model_dir, out_dir, "hf")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = world_tokenizer.WorldTokenizer()
    config = {"model_type": "modrwkv", "architectures": [ARCHITECTURES["hf"]], "auto_map": AUTO_MAP,
              **model.config.to_dict(), "placeholder_ids": PLACEHOLDER_IDS,
              "encoders": read_encoders_record(model_dir), "turn_end_ids": turn_end_ids(tokenizer),
              "dtype": "float32", "tie_word_embeddings": False}
    write_json(out_dir / "config.json", config)
    weights = {name: t.float() for name, t in cpu_state_dict(model).items()}  # fp32 copies, the model left as it is
    write_safetensors(weights, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    end_of_text = world_tokenizer.END_OF_TEXT
    # an answer ends its turn with "\n\n" (trained so), rarely with end-of-text: generate() stops at either token,
    # and at a turn end split over two tokens ("。\n" then "\n": `turn_end_ids`, the remote code's TurnEnd)
    turn_end = tokenizer.encode(TURN_END)
    write_json(out_dir / "generation_config.json", {"eos_token_id": [end_of_text, *turn_end],
                                                    "pad_token_id": end_of_text})
    write_json(out_dir / "tokenizer_config.json", {"auto_map": {"AutoTokenizer": AUTO_MAP["AutoTokenizer"]},
                                                   "tokenizer_class": "ModRWKVTokenizer"})
    shutil.copyfile(world_tokenizer.default_vocab_path(), out_dir / world_tokenizer.VOCAB_FILENAME)
    for source in sorted(REMOTE_CODE.glob("*.py")):
        shutil.copyfile(source, out_dir / source.name)
    for name, source in SHIPPED_MODULES.items():
        shutil.copyfile(source, out_dir / name)
    return out_dir


def turn_end_ids(tokenizer: world_tokenizer.WorldTokenizer) -> dict[str, list[int]]:
    """The tokens a reply's turn end ("\n\n") lies in: within one, or across the end of one and the start of the
    next. A few dozen ids each of the vocabulary's, so the remote code needs no tokenizer to stop there."""
    first, last = TURN_END[:1].encode(), TURN_END[-1:].encode()
    pieces = tokenizer.id_to_bytes.items()
    return {"within": sorted(i for i, b in pieces if TURN_END.encode() in b),
            "ends": sorted(i for i, b in pieces if b.endswith(first)),
            "starts": sorted(i for i, b in pieces if b.startswith(last))}


def export_fla(model: ModRWKV, model_dir, out_dir) -> Path:
    """The fla folder (config.json, model.safetensors) of `model`'s backbone, opened from `model_dir`; returns it."""
    check_out_dir(model_dir, out_dir, "fla")
    write_fla_folder(cpu_state_dict(model.backbone), model.config.backbone, out_dir)
    return Path(out_dir)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
