"""What train and eval configs name as data: feature-cache entries, or encode YAMLs (found in the cache or
encoded first), turned into cache URIs the Ray workers can open."""

from pathlib import Path

from preprocessing import storage

from .config import load_config
from .encode import EncodeConfig, run_encodes


def absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers do not run in the driver's working directory."""
    return uri if storage.is_remote(uri) else str(Path(uri).absolute())


def resolve_caches(entries: list[str], overrides: dict[str, dict] | None = None) -> list[str]:
    """`overrides`: encode YAML -> `--set`-style overrides of it (an experiment's variant of a shipped config). An
    encode YAML of a collection (`dataset.each_folder`) gives an entry per folder."""
    overrides = overrides or {}
    uris = [uri for e in entries for uri in (
        [r.uri for r in run_encodes(load_config(e, EncodeConfig, overrides.get(e)))] if is_encode_config(e) else [e])]
    return [absolute(u) for u in uris]


def resolve_cache(entry: str) -> str:
    """One cache (an evaluation's): an encode YAML of a collection is refused before anything is encoded."""
    if is_encode_config(entry) and load_config(entry, EncodeConfig).dataset.each_folder:
        raise ValueError(f"{entry}: a collection, encoded an entry per folder (dataset.each_folder); this reads one "
                         "cache: name one of its entries, or its folder as dataset.path with each_folder false")
    return resolve_caches([entry])[0]


def is_encode_config(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))
