"""What every frozen encoder wrapper shares: local-only loading, frozen eval mode, a weights fingerprint."""

import hashlib
from pathlib import Path

import torch


class FrozenEncoder:
    kind = "?"

    def __init__(self, model_dir, model: torch.nn.Module, device="cpu", dtype=torch.float32):
        self.model_dir = Path(model_dir)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @property
    def output_dim(self) -> int:
        return self.model.config.hidden_size

    def weights_hash(self) -> str:
        return hash_model_dir(self.model_dir)


def hash_model_dir(model_dir) -> str:
    """sha256 over the weight and config files of a model directory (what a feature cache must be keyed on)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight or config files")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def require_local_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; encoders load from a local directory (no hub access)")
    return path
