"""What every frozen encoder wrapper shares: local-only loading, frozen eval mode, a weights fingerprint and
the one call the encode job, chat and evaluation make: `encode(items, ids)`.

An encoder is two halves. `inputs` (an `EncoderInputs`: no weights, plain numpy out) turns one item into the
arrays its model reads: the image processor's resize and patchify, Whisper's log-mel, a series' normalisation.
`forward` batches those arrays and runs the model. `encode` is one after the other; the encode job runs the first
half in Ray Data's CPU tasks, beside the decoding, so that an encoder actor's one CPU never feeds its GPU alone."""

import json
from pathlib import Path

import numpy as np
import torch

from ..cache.key import hash_model_dir, nests_processor_settings

# a checkpoint's processor settings, where it ships them: alone (transformers 4's save_pretrained, the hub's
# checkpoints), or nested in a whole processor's file (transformers 5's ProcessorMixin.save_pretrained writes only
# that); the processor classes' from_pretrained read either
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def ships_processor(path: Path) -> bool:
    """Whether the folder holds the settings its processor class reads: a preprocessor_config.json, or a
    processor_config.json with them nested (not transformers 4's, of the processor's own options)."""
    preprocessor, processor = (path / name for name in PROCESSOR_FILES)
    return preprocessor.is_file() or (processor.is_file() and nests_processor_settings(processor.read_bytes()))


def check_model_type(path: Path, kind: str, *accepted: str) -> None:
    """Refuses a checkpoint of another architecture, which transformers loads with a warning, dropping the weights
    it does not know and drawing random ones for those it misses (DINOv2 with registers ran without its registers;
    a HuBERT folder as WavLM gave features that changed from load to load)."""
    found = json.loads((path / "config.json").read_text()).get("model_type")
    if found not in accepted:
        raise ValueError(f"{path}: a {found} checkpoint, not the {accepted[0]} model the {kind} encoder reads")


class EncoderInputs:
    """One item -> the arrays the model reads, on the host; a bad item raises ValueError naming `sample_id`.
    Picklable and light: the encode job builds it once in the driver and hands it to every decode task."""

    def prepare(self, item, sample_id: str) -> dict[str, np.ndarray]:
        raise NotImplementedError


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # an encoder section's `dtype`


class FrozenEncoder:
    kind = "?"

    def __init__(self, model_dir, model: torch.nn.Module, inputs: EncoderInputs, device="cpu", dtype=torch.float32):
        self.model_dir, self.inputs = Path(model_dir), inputs
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @property
    def output_dim(self) -> int:
        return self.model.config.hidden_size

    def encode(self, items: list, ids: list[str] | None = None) -> list[torch.Tensor]:
        """One float32 CPU tensor [L, D] per item. `ids` name the samples in the ValueError a bad item raises
        (default: the items' positions)."""
        ids = [str(i) for i in range(len(items))] if ids is None else list(ids)
        if len(ids) != len(items):
            raise ValueError(f"{len(items)} items but {len(ids)} sample ids")
        return self.forward([self.inputs.prepare(item, sid) for item, sid in zip(items, ids)])

    def forward(self, prepared: list[dict[str, np.ndarray]]) -> list[torch.Tensor]:
        """The features of a batch of `inputs.prepare` outputs: one float32 CPU tensor [L, D] each (no autograd
        graph: the weights are frozen and the inputs need no gradient)."""
        raise NotImplementedError

    def to_model(self, rows: list[np.ndarray]) -> torch.Tensor:
        """Equal-shaped host arrays stacked into one batch on the model's device, in its dtype."""
        return torch.from_numpy(np.stack(rows)).to(self.device, self.dtype)

    def weights_hash(self) -> str:
        return hash_model_dir(self.model_dir)


def right_padded(rows: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n_i, ...] laid into one zero-filled batch [B, length, ...], and the mask of their real entries
    [B, length] (1 real, 0 padding): how the feature extractors and processors pad a batch themselves."""
    batch = np.zeros((len(rows), length, *rows[0].shape[1:]), rows[0].dtype)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        batch[i, : len(row)], mask[i, : len(row)] = row, 1
    return batch, mask


def require_local_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; encoders load from a local directory (no hub access)")
    return path
