"""How precisely a projector normalises its features in a bf16 model: before, the cached fp16 features were cast to
bf16 and normalised in bf16 (statistics rounded to bf16, bf16 arithmetic, as DeepSpeed's bf16 engine and autocast
ran it); now `Projector.normalise` runs in fp32 whatever the model's dtype. Per training cache, with its modality's
default normalisation (`DEFAULT_NORMALIZE`: images whitened, audio and series standardised) and statistics
computed as training computes them (`feature_stats`, first 8 shards): the RMS error of the normalised features
against an fp64 run, per eigen-direction of the features' covariance (each normalised direction has unit spread in
whitening, so the error is relative), over vectors of the two shards after those.

    python benchmarks/whitening_precision.py [--vectors 20000] [--out benchmarks/out]
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

STATS_SHARDS = 8


def measure(encode_yaml: str, max_vectors: int) -> dict:
    import torch

    from modrwkv.multimodal import DEFAULT_NORMALIZE, Projector, ProjectorConfig
    from pipelines.caches import resolve_cache
    from pipelines.train_setup import feature_stats
    from preprocessing.cache.entry import FeatureCache

    cache = FeatureCache(resolve_cache(encode_yaml))
    kind = DEFAULT_NORMALIZE[cache.modality]
    stats = feature_stats([cache], {cache.modality: kind}, max_shards=STATS_SHARDS)[cache.modality]
    held_out = range(STATS_SHARDS, min(STATS_SHARDS + 2, len(cache.shards))) if len(cache.shards) > STATS_SHARDS \
        else range(len(cache.shards))  # a small cache: its statistics came from every shard
    items = [a for i in held_out for s in cache.read_shard(i) for a in s.items]
    features = torch.from_numpy(np.concatenate([a.reshape(-1, a.shape[-1]) for a in items])[:max_vectors])
    mean = torch.tensor(stats["mean"], dtype=torch.float64)
    scale = stats.get("whitening") or np.diag(1 / np.asarray(stats["std"]))
    scale = torch.tensor(np.asarray(scale), dtype=torch.float64)
    reference = (features.double() - mean) @ scale
    _, directions = torch.linalg.eigh(torch.cov(reference.T))  # ascending spread of the normalised features

    def per_direction(normalised: torch.Tensor) -> np.ndarray:
        error = (normalised.double() - reference) @ directions
        return (error.square().mean(0).sqrt() / (reference @ directions).square().mean(0).sqrt()).numpy()

    bf16 = torch.bfloat16
    before = (features.to(bf16) - mean.to(bf16)) @ scale.to(bf16)
    projector = Projector(ProjectorConfig(encoder_dim=features.shape[1], model_dim=8, normalize=kind))
    projector.set_feature_stats(stats["mean"], stats.get("std"), stats.get("whitening"))
    now = projector.bfloat16().normalise(features)
    rows = {}
    for name, normalised in (("bf16 (before)", before), ("fp32 (now)", now)):
        error = per_direction(normalised)
        rows[name] = {"smallest5": float(error[:5].mean()), "median": float(np.median(error)),
                      "largest5": float(error[-5:].mean()), "max": float(error.max())}
    return {"cache": encode_yaml, "modality": cache.modality, "normalize": kind, "vectors": len(features),
            "width": features.shape[1], "errors": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=20000)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    os.chdir(ROOT)  # the configs name paths relative to the repository

    from benchmarks.feature_precision import ENCODES  # every suite's training cache
    from benchmarks.report import write_report
    from pipelines.environment import cpu_description

    rows = [measure(encode, args.vectors) for encode in ENCODES]
    lines = ["| cache | normalise | vectors x width | in | smallest 5 directions | median | largest 5 | max |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {Path(r['cache']).stem} | {r['normalize']} | {r['vectors']} x {r['width']} | {name} | "
              f"{e['smallest5']:.2e} | {e['median']:.2e} | {e['largest5']:.2e} | {e['max']:.2e} |"
              for r in rows for name, e in r["errors"].items()]
    machine = f"{cpu_description()}, {platform.machine()}; relative RMS error per direction vs fp64"
    write_report(args.out, "whitening_precision", machine, rows, lines)


if __name__ == "__main__":
    main()
