"""What train and eval configs name as data: feature-cache entries, or encode YAMLs (found in the cache or
encoded first), turned into cache URIs the Ray workers can open."""

from collections.abc import Iterator
from pathlib import Path

from preprocessing import storage

from .config import load_config
from .encode import EncodeConfig, run_encode, run_encodes


def absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers do not run in the driver's working directory."""
    return uri if storage.is_remote(uri) else str(Path(uri).absolute())


def resolve_groups(entries: list[str], overrides: dict[str, dict] | None = None) -> list[list[str]]:
    """Each entry's cache URIs: itself, or its encode YAML's entry, or, for a YAML of a collection
    (`dataset.each_folder`), an entry per folder. `overrides`: encode YAML -> `--set`-style overrides of it (an
    experiment's variant of a shipped config)."""
    overrides = overrides or {}
    groups = [[r.uri for r in run_encodes(load_config(e, EncodeConfig, overrides.get(e)))] if is_encode_config(e)
              else [e] for e in entries]
    return [[absolute(u) for u in group] for group in groups]


def resolve_caches(entries: list[str], overrides: dict[str, dict] | None = None) -> list[str]:
    return [uri for group in resolve_groups(entries, overrides) for uri in group]


def resolve_cache(entry: str, overrides: dict | None = None) -> str:
    """One cache (an evaluation's): an encode YAML of a collection is refused before anything is encoded."""
    if not is_encode_config(entry):
        return absolute(entry)
    config = load_config(entry, EncodeConfig, overrides)
    if config.dataset.each_folder:
        raise ValueError(f"{entry}: a collection, encoded an entry per folder (dataset.each_folder); this reads one "
                         "cache: name one of its entries, or its folder as dataset.path with each_folder false")
    return absolute(run_encode(config).uri)


def per_group(groups: list[list[str]], sizes: list[int]) -> Iterator[tuple[list[str], list[int]]]:
    """Each configured entry's caches with their sample counts (`sizes`, one per cache, in order)."""
    if sum(map(len, groups)) != len(sizes):
        raise ValueError(f"{len(sizes)} sample counts for {sum(map(len, groups))} caches")
    at = 0
    for group in groups:
        yield group, list(sizes[at:at + len(group)])
        at += len(group)


def spread_mix(mix: list[float], groups: list[list[str]], sizes: list[int]) -> list[float]:
    """Sampling weights given one per configured entry, as one per cache: a collection's spread over its entries by
    their sample counts (`sizes`, in order), so that it is drawn from as one cache of them all would be."""
    weights = []
    for weight, (group, counts) in zip(mix, per_group(groups, sizes), strict=True):
        if not sum(counts):
            raise ValueError(f"{group[0]}{' ...' if len(group) > 1 else ''}: no sample to draw with weight {weight}")
        weights += [weight * n / sum(counts) for n in counts]
    return weights


def too_small(groups: list[list[str]], sizes: list[int], world: int) -> list[str]:
    """The entries of collections holding fewer samples than the `world` workers, who each take samples of their own
    from an entry drawn (a small dataset's folder): left out of the draw. A cache named alone that small is refused."""
    small = []
    for group, counts in per_group(groups, sizes):
        for uri, n in zip(group, counts, strict=True):
            if 0 < n < world and len(group) == 1:
                raise ValueError(f"{uri}: {n} samples for {world} workers; every worker takes samples of its own")
            if 0 < n < world:
                small.append(uri)
    return small


def draw_weights(mix: list[float] | None, groups: list[list[str]], sizes: list[int],
                 world: int) -> tuple[list[float], list[str]]:
    """Each cache's weight in the draw of micro-batches (`mix`, one per configured entry, spread over a collection's
    entries; None: sample counts), and the entries left out (`too_small`: weight 0)."""
    left_out = too_small(groups, sizes, world)
    uris = [uri for group in groups for uri in group]
    drawn = [0 if uri in left_out else n for uri, n in zip(uris, sizes)]
    for group, counts in per_group(groups, drawn):
        if not sum(counts) and set(group) & set(left_out):
            raise ValueError(f"{group[0]} ...: every entry of this collection holds fewer samples than the {world} "
                             "workers, who each take samples of their own")
    weights = drawn if mix is None else spread_mix(mix, groups, drawn)
    if not sum(weights):
        raise ValueError(f"no cache holds a sample to draw for {world} workers: {', '.join(uris)}")
    return weights, left_out


def is_encode_config(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))
