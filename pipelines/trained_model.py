"""A trained model folder opened on any node of a cluster: a path, or an s3:// URI read from this node's copy. An
adapter-only folder (phase I) whose backbone was recorded by URI gets it from this node's copy as well, checked
against the recorded sha256; `ModRWKV.from_pretrained` resolves local backbones itself."""

from pathlib import Path

import torch

from modrwkv import RWKV7
from modrwkv.checkpoint import CheckpointError
from modrwkv.model_folder import ADAPTER_FILE, backbone_weights, file_sha256, read_backbone_source
from modrwkv.multimodal import ModRWKV
from preprocessing import storage
from preprocessing.local_copy import local_copy


def recorded_remote_backbone(folder: Path) -> RWKV7 | None:
    """The backbone an adapter-only folder records by URI, or None (a full save, or a local backbone)."""
    source = read_backbone_source(folder) or {}
    if not (folder / ADAPTER_FILE).is_file() or not storage.is_remote(source.get("path", "")):
        return None
    path = Path(local_copy(source["path"]))
    if "sha256" in source and file_sha256(backbone_weights(path)) != source["sha256"]:
        raise CheckpointError(f"{folder}: its backbone {source['path']} now holds other weights than the recorded "
                              "sha256")
    return fp32_backbone(path)


def fp32_backbone(path: str | Path) -> RWKV7:
    """A backbone as training built the adapter beside it, and as a local recorded one loads: in fp32, whatever dtype
    it was saved in (a bf16 one would make the whole model bf16, the adapter's trained weights rounded)."""
    return RWKV7.from_pretrained(path, dtype=torch.float32)


def load_trained_model(checkpoint: str, backbone_path: str | None = None) -> ModRWKV:
    """`backbone_path` (a folder, a .pth or an s3:// URI): an adapter-only folder's backbone in place of the one
    it records."""
    folder = Path(local_copy(checkpoint))
    if backbone_path and not (folder / ADAPTER_FILE).is_file():  # it would be loaded, then ignored
        raise ValueError(f"{checkpoint}: a full model folder (phase II's) holds its own backbone: a backbone given "
                         "beside it (--backbone) is for an adapter-only folder")
    backbone = fp32_backbone(local_copy(backbone_path)) if backbone_path else recorded_remote_backbone(folder)
    return ModRWKV.from_pretrained(folder, backbone=backbone)
