"""LLaVA-format data the way LLaVA's own is: image samples, text-only conversations and a few samples far over
a small context length, in one file."""

import json
from pathlib import Path

from preprocessing.demo_data import build_digits


def mixed_llava(folder: Path, n_images: int = 24, n_long: int = 2) -> Path:
    """`n_images` digit images (images/ under `folder`), 4 text-only conversations and `n_long` image samples
    of about 300 tokens, as `folder/mixed.json`."""
    build_digits(folder, n_train=n_images, n_test=0)
    records = json.loads((folder / "train.json").read_text())
    records += [{"id": f"text-{i}", "conversations": [{"from": "human", "value": f"Say {w}."},
                                                       {"from": "gpt", "value": w}]}
                for i, w in enumerate(["hello", "yes", "no", "maybe"])]
    records += [{**records[i], "id": f"long-{i}", "conversations": [
        {"from": "human", "value": "<image>\n" + "Look closely. " * 60}, {"from": "gpt", "value": "seven"}]}
        for i in range(n_long)]
    (folder / "mixed.json").write_text(json.dumps(records))
    return folder / "mixed.json"


def mixed_llava_cache(folder: Path, clip: Path) -> str:
    """`mixed_llava` with 3 samples of about 300 tokens, encoded by the CLIP saved at `clip`, as a cache under
    `folder`."""
    from pipelines.config import from_dict
    from pipelines.encode import EncodeConfig, run_encode

    return run_encode(from_dict(EncodeConfig, {
        "dataset": {"format": "llava", "path": str(mixed_llava(folder / "digits", n_long=3))},
        "encoder": {"kind": "clip", "model_dir": str(clip)},
        "cache": {"root": str(folder / "cache"), "shard_size": 8}})).uri
