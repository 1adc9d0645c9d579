"""What train and eval configs name as data: feature-cache entries, or encode YAMLs (found in the cache or
encoded first), turned into cache URIs the Ray workers can open."""

from pathlib import Path

from preprocessing import storage

from .config import load_config
from .encode import EncodeConfig, run_encode


def absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers do not run in the driver's working directory."""
    return uri if storage.is_remote(uri) else str(Path(uri).absolute())


def resolve_caches(entries: list[str], overrides: dict[str, dict] | None = None) -> list[str]:
    """`overrides`: encode YAML -> `--set`-style overrides of it (an experiment's variant of a shipped config)."""
    overrides = overrides or {}
    uris = [run_encode(load_config(e, EncodeConfig, overrides.get(e))).uri if e.endswith((".yaml", ".yml")) else e
            for e in entries]
    return [absolute(u) for u in uris]
