"""A trained ModRWKV's folder, written and read here alone (`ModRWKV.save_pretrained` and `from_pretrained` build
the model around it; the training drivers add the records):

    modrwkv_config.json   the architecture: backbone config, projectors, forecast head
    model.safetensors     every weight (a phase II model), or
    adapter.safetensors   every weight but the backbone's (phase I's output), with
    backbone_source.json  where that backbone is: its absolute path, its path relative to this folder (a run
                          tree copied elsewhere still finds it) and the sha256 of its weights (what either must hold)
    encoders.json         per modality, the frozen encoder its features came from (kind, input size, layer,
                          weights hash): inference must encode media as training's caches did

The projectors' feature statistics (mean, std or whitening matrix) are buffers among the weights.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

# a backbone folder names its weights alike
from .checkpoint import WEIGHTS_FILE, CheckpointError, read_safetensors, write_safetensors

CONFIG_FILE = "modrwkv_config.json"
ADAPTER_FILE = "adapter.safetensors"
BACKBONE_SOURCE_FILE = "backbone_source.json"
ENCODERS_FILE = "encoders.json"
# what of a store key decides features: the encoder and how it ran, our code's revision of them, how they were stored;
# a series window's length; "differing" names those the caches a model trained on did not agree on
ENCODER_SETTINGS = ("kind", "dtype", "image_size", "layer", "weights_hash", "revision", "precision", "lookback",
                    "differing")


def in_adapter(name: str) -> bool:
    """Whether an adapter-only folder holds the model's tensor `name`: all but the backbone's."""
    return not name.startswith("backbone.")


def write_model_folder(directory, config: dict, state: dict, adapter_only: bool = False,
                       backbone_source: dict | None = None, encoders: dict[str, dict] | None = None) -> None:
    """The config and weights (`state`: every tensor, CPU; adapter_only: all but the backbone's), then the records
    given (see `write_records`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if adapter_only:
        write_safetensors({k: v for k, v in state.items() if in_adapter(k)}, directory / ADAPTER_FILE)
    else:
        write_safetensors(state, directory / WEIGHTS_FILE)
    # a folder holds one model: another save's weights left beside these would be read in their place
    (directory / (WEIGHTS_FILE if adapter_only else ADAPTER_FILE)).unlink(missing_ok=True)
    write_records(directory, backbone_source, encoders)


@dataclass
class FolderContents:
    config: dict
    weights: dict  # name -> tensor: every weight, or all but the backbone's when adapter_only
    weights_file: Path
    adapter_only: bool


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; CheckpointError naming the file when it holds none."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def read_model_folder(directory) -> FolderContents:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; expected a ModRWKV save_pretrained directory")
    config = read_json_object(directory / CONFIG_FILE)
    if (directory / WEIGHTS_FILE).is_file() and (directory / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{directory}: both {WEIGHTS_FILE} and {ADAPTER_FILE}, from two saves; which one its "
                              f"{CONFIG_FILE} describes is unknown: save the model again, or remove the stale file")
    for name, adapter_only in ((WEIGHTS_FILE, False), (ADAPTER_FILE, True)):
        if (directory / name).is_file():
            return FolderContents(config, read_safetensors(directory / name), directory / name, adapter_only)
    raise CheckpointError(f"{directory}: neither {WEIGHTS_FILE} nor {ADAPTER_FILE}")


def write_records(directory, backbone_source: dict | None = None, encoders: dict[str, dict] | None = None) -> None:
    """What a folder records beside its weights, each when given. backbone_source: {"path": the backbone's folder
    or .pth, plus what the trainer notes (run id, phase)}; encoders: modality -> the feature store key of the
    caches it trained on (the cache manifests')."""
    directory = Path(directory)
    if backbone_source is not None:
        if "path" not in backbone_source:
            raise ValueError(f"a backbone source needs a path, got {sorted(backbone_source)}")
        if "://" in str(backbone_source["path"]):  # a URI (s3://): its weights' sha256 is the caller's to give
            record = dict(backbone_source)
        else:
            backbone = Path(backbone_source["path"]).absolute()
            record = {**backbone_source, "path": str(backbone),
                      "relative_path": os.path.relpath(backbone, directory.absolute())}
            if backbone_weights(backbone).is_file():
                record["sha256"] = file_sha256(backbone_weights(backbone))
        (directory / BACKBONE_SOURCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if encoders is not None:
        record = {modality: {k: key.get(k) for k in ENCODER_SETTINGS if k in key or k != "differing"}
                  for modality, key in encoders.items()}
        (directory / ENCODERS_FILE).write_text(json.dumps(record, indent=1) + "\n")


def read_backbone_source(directory) -> dict | None:
    """What the folder records of its backbone, or None."""
    path = Path(directory) / BACKBONE_SOURCE_FILE
    return read_json_object(path) if path.is_file() else None


def read_encoders_record(directory) -> dict[str, dict]:
    """modality -> the encoder settings its features came from; {} for a folder that records none."""
    path = Path(directory) / ENCODERS_FILE
    return read_json_object(path) if path.is_file() else {}


def resolve_backbone(directory) -> Path:
    """The backbone an adapter-only folder was trained on: by its path relative to the folder first, then its
    absolute path; either must hold the recorded weights (sha256), when the record has their hash."""
    directory = Path(directory)
    source = read_backbone_source(directory)
    if source is None:
        raise CheckpointError(f"{directory}: an adapter-only checkpoint needs the backbone it was trained on "
                              f"(give it, or record it in {BACKBONE_SOURCE_FILE})")
    if "://" in str(source.get("path", "")):  # Path() would read s3://b/k as the local s3:/b/k
        raise CheckpointError(f"{directory}: its backbone is recorded at {source['path']}, not a local path: pass "
                              "backbone= (a local copy of it), or open the folder with "
                              "pipelines.trained_model.load_trained_model, which fetches it")
    candidates = ([directory / source["relative_path"]] if source.get("relative_path") else []) + [Path(source["path"])]
    mismatched = []
    for candidate in candidates:
        if not backbone_weights(candidate).is_file():
            continue
        if "sha256" in source and file_sha256(backbone_weights(candidate)) != source["sha256"]:
            mismatched.append(str(candidate))
            continue
        return candidate
    found = f"; {', '.join(mismatched)} hold other weights than the recorded sha256" if mismatched else ""
    raise CheckpointError(f"{directory}: its backbone is at none of {[str(c) for c in candidates]} "
                          f"({BACKBONE_SOURCE_FILE}){found}; pass backbone= to load it with another copy")


def backbone_weights(path: Path) -> Path:
    """The file holding a backbone's weights: a save_pretrained folder's, or the RWKV-LM .pth itself."""
    return path / WEIGHTS_FILE if path.is_dir() else path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
