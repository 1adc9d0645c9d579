"""Which 8-bit form keeps cached features best: the relative error ||x - decoded|| / ||x|| of each training cache's
vectors stored as the shipped int8 (a scale per vector, `preprocessing/cache/precision.py`) and as fp8 e4m3 with a
scale per vector (max |v| mapped to e4m3's 448; a candidate, computed here, not a store precision), beside each
cache's fp16 values as stored. The bytes are the same (one a value plus a scale a vector); the error decides.

Caches: the demo's, the shapes suite's and El Nino's training sets (encode YAMLs, found in the cache or encoded
first), the first `--items` items of each.

    python benchmarks/feature_precision.py [--items 512] [--out benchmarks/out]
"""

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the project's packages, not this folder's modules
    sys.path[0] = str(ROOT)

ENCODES = ("configs/demo/encode_digits_train.yaml", "configs/demo/encode_speech_train.yaml",
           "configs/demo/encode_co2_train.yaml", "configs/quality/encode_shapes_train.yaml",
           "configs/quality/encode_elnino_train.yaml")
E4M3_MAX = 448.0


def relative_error(vectors: list[np.ndarray], decoded: list[np.ndarray]) -> float:
    x, y = np.concatenate(vectors), np.concatenate(decoded)
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def fp8_round_trip(features: np.ndarray) -> np.ndarray:
    import torch

    values = torch.from_numpy(features.astype(np.float32))
    scale = values.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return ((values / scale).to(torch.float8_e4m3fn).float() * scale).numpy()


def measure(encode_yaml: str, items: int) -> dict:
    from pipelines.caches import resolve_cache
    from preprocessing.cache.entry import FeatureCache
    from preprocessing.cache.precision import from_stored, to_stored

    cache = FeatureCache(resolve_cache(encode_yaml))
    vectors = []
    for shard in range(len(cache.shards)):
        vectors += [item.astype(np.float32) for sample in cache.read_shard(shard) for item in sample.items]
        if len(vectors) >= items:
            break
    vectors = vectors[:items]
    channel_max = np.abs(np.concatenate(vectors)).max(axis=0)
    return {"cache": encode_yaml, "store": cache.manifest["feature_store"], "items": len(vectors),
            "vectors": sum(len(v) for v in vectors), "width": vectors[0].shape[1],
            "int8": relative_error(vectors, [from_stored(to_stored(v, "int8"), "int8") for v in vectors]),
            "fp8_e4m3": relative_error(vectors, [fp8_round_trip(v) for v in vectors]),
            "channel_absmax_spread": float(channel_max.max() / np.median(channel_max))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    os.chdir(ROOT)  # the configs name paths relative to the repository

    from benchmarks.report import write_report
    from pipelines.environment import cpu_description

    rows = [measure(encode, args.items) for encode in ENCODES]
    lines = ["| cache | items | vectors x width | int8 error | fp8 e4m3 error | fp8 / int8 | largest / median channel "
             "absmax |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {Path(r['cache']).stem} | {r['items']} | {r['vectors']} x {r['width']} | {r['int8']:.4f} | "
              f"{r['fp8_e4m3']:.4f} | {r['fp8_e4m3'] / r['int8']:.1f}x | {r['channel_absmax_spread']:.1f} |"
              for r in rows]
    machine = f"{cpu_description()}, {platform.machine()}; relative error of the stored fp16 features"
    write_report(args.out, "feature_precision", machine, rows, lines)


if __name__ == "__main__":
    main()
