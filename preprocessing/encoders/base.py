"""What every frozen encoder wrapper shares: local-only loading, frozen eval mode, a weights fingerprint and
the one call the encode job, chat and evaluation make: `encode(items, ids)`."""

from pathlib import Path

import torch

from ..cache.key import hash_model_dir


class FrozenEncoder:
    kind = "?"

    def __init__(self, model_dir, model: torch.nn.Module, device="cpu", dtype=torch.float32):
        self.model_dir = Path(model_dir)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @property
    def output_dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, items: list, ids: list[str] | None = None) -> list[torch.Tensor]:
        """One float32 CPU tensor [L, D] per item. `ids` name the samples in the ValueError a bad item raises
        (default: the items' positions)."""
        ids = [str(i) for i in range(len(items))] if ids is None else list(ids)
        if len(ids) != len(items):
            raise ValueError(f"{len(items)} items but {len(ids)} sample ids")
        return self.encode_batch(items, ids)

    def encode_batch(self, items: list, ids: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def weights_hash(self) -> str:
        return hash_model_dir(self.model_dir)


def require_local_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; encoders load from a local directory (no hub access)")
    return path
