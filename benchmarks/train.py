"""Training throughput on the demo's digits cache (DINOv2 features, the demo's tiny RWKV-7, phase II):
samples/s with 1 vs 2 Ray Train workers under ZeRO-2, and ZeRO stage 1 vs 2 with 2 workers; then the time a step
waits for its input with the cache on local disk vs in S3 (a local moto endpoint), shards read ahead or not.

Each case is a real `run_train` (Ray Train + DeepSpeed, MLflow to a local SQLite file); samples/s is the mean
of the per-step figures after the first step, the same global batch in every case (right-padded batches).

Packing: phase II padded vs packed on two length mixes: real (non-pad) tokens/s and the padding
fraction (MLflow's per-step metrics). The spread mix is synthetic and LLaVA-665K-like (`spread_samples`), trained
on the demo's backbone and on a wider random one (`WIDE`); the demo's mix is its three caches, drawn 2:1:1 as
configs/demo/train.yaml does. A padded micro-batch is 8 samples (4 on the wider backbone); a packed one as many
rows of max_length tokens as hold as many samples on average (at least one), so both steps hold about as many
samples (and pay the optimizer step as often). Then the forward and backward alone, in CPU seconds
(`compute_cases`): what packing saves, without the trainer's per-step costs and the other work on the cores.

Allocator: phase II on the digits cache with the training workers' shipped glibc settings (`pipelines.train.
WORKER_ENV`) vs glibc's defaults, alternated, 2 workers.

    python benchmarks/train.py [--out benchmarks/out] [--steps 12] [--only scaling|allocator|packing|compute]
"""

import argparse
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's files
os.chdir(ROOT)

import torch  # noqa: E402

from benchmarks.report import cpu_line, write_report  # noqa: E402

CASES = [(1, 2), (2, 1), (2, 2)]  # (workers, ZeRO stage)
DEMO_BACKBONE = "runs/demo/backbone"
# A backbone whose layers, not its 65536-word head, take most of the compute, as in the released sizes (0.1B:
# 12 layers of width 768): padding costs layer compute only, the head runs at labelled positions in both layouts.
WIDE = {"vocab_size": 65536, "n_layer": 6, "n_embd": 512, "head_size": 64}
PARTS = ["scaling", "allocator", "packing", "compute"]
ALLOCATORS = ("shipped", "glibc defaults")  # the training workers' settings (pipelines.train.WORKER_ENV) or none


def config(out: Path, cache: str, workers: int, stage: int, steps: int, prefetch: int = 4, packing: bool = False,
           micro: int = 8, name: str = "bench", backbone: str = DEMO_BACKBONE):
    """Phase II of `micro` samples (or packed rows) per micro-batch, two micro-batches a step."""
    from pipelines.config import from_dict
    from pipelines.train import TrainConfig

    return from_dict(TrainConfig, {
        "name": name, "caches": [cache], "output_dir": str(out), "prefetch_threads": prefetch, "packing": packing,
        "model": {"backbone": {"path": backbone},
                  "projectors": {"image": {"kernel": 3, "stride": 2, "adapter_scale": 2}}},
        "phase1": {"lr": 1e-3, "steps": 1, "global_batch": 16, "micro_batch": 8},
        # 1 worker accumulates 2 micro-batches
        "phase2": {"lr": 1e-3, "steps": steps, "global_batch": 2 * micro, "micro_batch": micro},
        "deepspeed": {"zero_stage": stage}, "scaling": {"workers": workers, "max_failures": 0},
        "tracking": {"tracking_uri": f"sqlite:///{(out / 'mlflow.db').absolute()}", "experiment": "bench"}})


def demo_config(out: Path, steps: int, packing: bool = False, micro: int = 8):
    """configs/demo/train.yaml (its caches, mix, projectors, max_length), phase II as `config` sets it."""
    from pipelines.config import load_config
    from pipelines.train import TrainConfig

    return load_config("configs/demo/train.yaml", TrainConfig, {
        "name": "bench-demo-mix", "output_dir": str(out), "packing": packing, "phase1.steps": 1,
        "phase1.warmup_steps": 0, "phase2.steps": steps, "phase2.warmup_steps": 0, "phase2.global_batch": 2 * micro,
        "phase2.micro_batch": micro,
        "phase2.checkpoint_every": 0, "scaling.max_failures": 0, "tracking.system_metrics_every_s": 0,
        "tracking.tracking_uri": f"sqlite:///{(out / 'mlflow.db').absolute()}", "tracking.experiment": "bench"})


WORDS = "the a man woman dog cat on in at red blue green small large picture shows holds near street table".split()


def spread_samples(n: int, seed: int = 0) -> list:
    """LLaVA-665K-like samples: one image (65 random 384-wide feature vectors, DINOv2-S's shape, 32 tokens after
    the (3, 2) compression) and a question and answer of random words, their total lognormal in length (median
    150 words, sigma 1, clipped to [20, 1900]), half of it the answer: ~60 to ~2,000 tokens a sample."""
    from modrwkv.conversation import Sample
    from modrwkv.conversation import Turn

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        words = int(np.clip(rng.lognormal(np.log(150), 1.0), 20, 1900))
        question, answer = (" ".join(rng.choice(WORDS, k)) for k in (words // 2, words - words // 2))
        samples.append(Sample(f"spread-{i}", "image", [Turn("user", f"<image>\n{question}"), Turn("assistant", answer)],
                              items=[rng.standard_normal((65, 384)).astype(np.float16)]))
    return samples


def spread_collator(backbone_config, max_length: int = 2048):
    """The collator of the spread mix's model: images through a (3, 2) compression, as `config` sets it."""
    from modrwkv.batching import Collator
    from modrwkv.multimodal import ModRWKVConfig, ProjectorConfig
    from modrwkv.tokenizer import WorldTokenizer

    model = ModRWKVConfig(backbone_config, {"image": ProjectorConfig(encoder_dim=384, kernel=3, stride=2,
                                                                     adapter_scale=2)})
    return Collator(WorldTokenizer(), model, max_length)


def token_lengths(samples: list) -> list[int]:
    from modrwkv import RWKV7Config

    collator = spread_collator(RWKV7Config(vocab_size=65536, n_layer=1, n_embd=64, head_size=64))
    return [len(e.ids) for e in collator.encode_all(samples)[0]]


def compute_cases(rounds: int = 2) -> list[dict]:
    """Phase II's forward and backward alone, in this process on one thread: the same 64 spread samples as
    padded micro-batches of 8 and as packed rows, timed in CPU seconds (what other sessions on the cores do not
    stretch), the two layouts alternating. Real tokens per CPU second, and the same without the LM head (the
    backbone's hidden states into a stand-in loss), which padding costs nothing."""
    import time

    from modrwkv import RWKV7, RWKV7Config
    from modrwkv.batching import first_fit_decreasing
    from modrwkv.multimodal import ModRWKV
    from tests.conftest import random_backbone

    torch.set_num_threads(1)
    samples = spread_samples(64, seed=1)
    rows = []
    for name, backbone in (("demo's: L2, C128", RWKV7.from_pretrained(DEMO_BACKBONE)),
                           ("L6, C512", random_backbone(RWKV7Config(**WIDE)))):
        collator = spread_collator(backbone.config)
        model = ModRWKV(collator.config, backbone).train()
        encoded, _ = collator.encode_all(samples)
        bins = first_fit_decreasing([len(e.ids) for e in encoded], collator.max_length)
        layouts = {"padded": [collator(samples[i : i + 8]) for i in range(0, len(samples), 8)],
                   "packed": [collator.pack([[encoded[i] for i in row]]) for row in bins]}

        def run(batch, head: bool):
            if head:
                loss = model(batch.input_ids, batch.features, attention_mask=batch.attention_mask,
                             labels=batch.labels, cu_seqlens=batch.cu_seqlens, return_logits=False).loss
            else:
                embeds = model.embed(batch.input_ids, batch.features, cu_seqlens=batch.cu_seqlens)
                hidden, _ = model.backbone.forward_hidden(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                                          cu_seqlens=batch.cu_seqlens)
                loss = hidden.square().mean()
            loss.backward()

        seconds = {(layout, head): 0.0 for layout in layouts for head in (True, False)}
        for _ in range(rounds):
            for layout, head in seconds:
                started = time.process_time()
                for batch in layouts[layout]:
                    run(batch, head)
                seconds[layout, head] += time.process_time() - started
        tokens = sum(b.n_tokens for b in layouts["packed"]) * rounds
        for layout, batches in layouts.items():
            rows.append({"backbone": name, "layout": layout, "micro_batches": len(batches),
                         "padding_fraction": 1 - sum(b.n_tokens for b in batches) / sum(b.slots for b in batches),
                         "tokens_per_cpu_s": tokens / seconds[layout, True],
                         "body_tokens_per_cpu_s": tokens / seconds[layout, False]})
    return rows


def demo_mean_length(cfg) -> float:
    """The demo caches' mean sample length (manifest lengths, compressed items), weighted by the phase II mix."""
    from pipelines.caches import resolve_caches
    from preprocessing.cache.entry import FeatureCache

    caches = [FeatureCache(u) for u in resolve_caches(cfg.phase_caches(cfg.phase2))]
    means = []
    for cache in caches:  # every sample is over a length of 0: the manifest's lengths of them all
        compressed = cfg.model.projectors[cache.modality].compressed_length
        means.append(np.mean([x["tokens"] for x in cache.over_length(0, compressed)]))
    weights = cfg.phase2.mix or [len(c) for c in caches]
    return float(np.average(means, weights=weights))


def packing_cases(out: Path, steps: int) -> tuple[list[dict], dict]:
    """Phase II, ZeRO-2, padded then packed: the spread mix on the demo's backbone and on a wider one, and the
    demo's mix on the demo's backbone. The wider backbone's padded micro-batches of 8 do not fit in this machine's
    memory (24 GB; Ray's memory monitor kills the worker even with nothing else running): it runs 1 worker and
    micro-batches of 4 samples."""
    from mlflow import MlflowClient

    from modrwkv import RWKV7Config
    from pipelines.train import run_train
    from tests.cache_entries import write_entry
    from tests.conftest import random_backbone

    samples = spread_samples(512)
    lengths = token_lengths(samples)
    spread_uri = str(out / "spread-cache")
    write_entry(spread_uri, [samples[i : i + 32] for i in range(0, len(samples), 32)])
    spread = dict(zip(("min", "p25", "median", "p75", "max"), np.percentile(lengths, [0, 25, 50, 75, 100])),
                  mean=float(np.mean(lengths)))
    wide = out / "wide-backbone"
    random_backbone(RWKV7Config(**WIDE)).save_pretrained(wide)

    def spread_config(backbone, name, workers):
        return lambda packing, micro: config(out, spread_uri, workers, 2, steps, packing=packing, micro=micro,
                                             name=name, backbone=backbone)

    spread_mix = "spread (LLaVA-665K-like), max_length 2048"
    demo_mix = "demo (digits, speech, CO2 2:1:1), max_length 256"
    # (mix, backbone, its config, the mix's mean tokens a sample or None: from the caches, samples a padded micro-batch)
    cases = [(spread_mix, "demo's: L2, C128", spread_config(DEMO_BACKBONE, "bench-spread", 2), spread["mean"], 8),
             (spread_mix, "L6, C512", spread_config(str(wide), "bench-spread-wide", 1), spread["mean"], 4),
             (demo_mix, "demo's: L2, C128", lambda packing, micro: demo_config(out, steps, packing, micro), None, 8)]
    rows = []
    for mix, backbone, make, mean, samples_per_micro in cases:
        padded = make(False, samples_per_micro)
        run_train(padded, phase=1)  # phase II starts from a phase I output
        mean = mean or demo_mean_length(padded)
        rows_per_micro = max(1, round(samples_per_micro * mean / padded.max_length))
        for packing, micro in ((False, samples_per_micro), (True, rows_per_micro)):
            result = run_train(make(packing, micro), phase=2)
            client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
            metrics = {m: mean_after_first(client, result.run_id, m)
                       for m in ("padding_fraction", "tokens_per_s", "samples_per_s")}
            rows.append({"mix": mix, "backbone": backbone, "workers": padded.scaling.workers, "packing": packing,
                         "micro_batch": micro, "mean_tokens": mean, **metrics})
    return rows, spread


def mean_after_first(client, run_id: str, metric: str) -> float:
    per_step = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)[1:]
    return sum(m.value for m in per_step) / len(per_step)


def copy_to_s3(cache: str, bucket: str) -> str:
    from preprocessing import storage

    uri = f"s3://{bucket}/cache/{Path(cache).name}"
    for path in sorted(Path(cache).iterdir()):
        storage.write_atomic(f"{uri}/{path.name}", path.read_bytes())
    return uri


def input_wait(out: Path, cache: str, s3_cache: str, steps: int) -> list[dict]:
    """Phase II with 2 workers from each cache copy, shards read ahead (the default) or on the training thread."""
    from mlflow import MlflowClient

    from pipelines.train import run_train

    rows = []
    for where, uri in (("local disk", cache), ("S3 (moto)", s3_cache)):
        for prefetch in (0, 4):
            result = run_train(config(out, uri, 2, 2, steps, prefetch), phase=2)
            client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
            rows.append({"cache": where, "prefetch_threads": prefetch,
                         "data_wait_s": mean_after_first(client, result.run_id, "data_wait_s"),
                         "samples_per_s": mean_after_first(client, result.run_id, "samples_per_s")})
    return rows


def digits_cache(out: Path, steps: int) -> str:
    """The demo's digits cache (encoded if missing) and a phase I output beside it for phase II to start from."""
    from benchmarks.encode import encode_config
    from pipelines.encode import run_encode
    from pipelines.train import run_train

    cache = run_encode(encode_config(Path("runs/cache"), 2)).uri
    run_train(config(out, cache, 2, 2, steps), phase=1)
    return cache


def scaling_cases(out: Path, cache: str, steps: int) -> tuple[list[dict], list[dict], list[str]]:
    """Workers and ZeRO stages, then the input wait from local disk vs S3 (the "bench" bucket); their rows and
    table lines."""
    from mlflow import MlflowClient

    from pipelines.train import run_train

    rows = []
    for workers, stage in CASES:
        result = run_train(config(out, cache, workers, stage, steps), phase=2)
        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        rows.append({"workers": workers, "zero_stage": stage, "wall_s": result.seconds,
                     "samples_per_s": mean_after_first(client, result.run_id, "samples_per_s")})
    waits = input_wait(out, cache, copy_to_s3(cache, "bench"), 36)  # 2.25 epochs of each worker's 4 shards
    base = rows[0]["samples_per_s"]
    lines = ["| workers | ZeRO | samples/s | vs 1 worker | job wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['zero_stage']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}x "
              f"| {r['wall_s']:.0f} |" for r in rows]
    local = waits[1]["data_wait_s"]
    lines += ["", "| cache | reader threads | input wait per step, ms | vs local, read ahead | samples/s |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['cache']} | {r['prefetch_threads']} | {r['data_wait_s'] * 1e3:.1f} | "
              f"{r['data_wait_s'] / local:.2f}x | {r['samples_per_s']:.1f} |" for r in waits]
    return rows, waits, lines


@contextmanager
def glibc_allocator_defaults():
    """Training workers started without the allocator settings `pipelines.train` gives them (glibc's defaults,
    where the driver's environment sets none)."""
    import pipelines.train

    shipped, pipelines.train.WORKER_ENV = pipelines.train.WORKER_ENV, {}
    try:
        yield
    finally:
        pipelines.train.WORKER_ENV = shipped


def allocator_cases(out: Path, cache: str, steps: int, rounds: int = 2) -> tuple[list[dict], list[str]]:
    """Phase II with 2 workers, the shipped allocator settings vs glibc's defaults, alternated `rounds` times so
    that both see the same machine; their rows and table lines."""
    from mlflow import MlflowClient

    from pipelines.train import run_train

    rows = []
    for round_ in range(rounds):
        for allocator in ALLOCATORS:
            with glibc_allocator_defaults() if allocator != "shipped" else nullcontext():
                result = run_train(config(out, cache, 2, 2, steps), phase=2)
            client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
            rows.append({"allocator": allocator, "round": round_, "wall_s": result.seconds,
                         "samples_per_s": mean_after_first(client, result.run_id, "samples_per_s")})
    per_round = {a: [r["samples_per_s"] for r in rows if r["allocator"] == a] for a in ALLOCATORS}
    baseline = np.mean(per_round["glibc defaults"])
    lines = ["| worker allocator | samples/s, each round | mean | vs glibc defaults |", "|---|---|---|---|"]
    lines += [f"| {a} | {' / '.join(f'{x:.1f}' for x in xs)} | {np.mean(xs):.1f} | {np.mean(xs) / baseline:.2f}x |"
              for a, xs in per_round.items()]
    return rows, lines


def packing_lines(packed: list[dict], spread: dict) -> list[str]:
    lines = ["spread mix, tokens a sample: " + ", ".join(f"{k} {v:.0f}" for k, v in spread.items()), "",
             "| mix | backbone | workers | layout | micro-batch | padding fraction | real tokens/s | samples/s "
             "| tokens/s vs padded |", "|---|---|---|---|---|---|---|---|---|"]
    for r in packed:
        padded = next(b for b in packed if (b["mix"], b["backbone"]) == (r["mix"], r["backbone"]) and not b["packing"])
        layout, unit = ("packed", "rows") if r["packing"] else ("padded", "samples")
        lines.append(f"| {r['mix']} | {r['backbone']} | {r['workers']} | {layout} | {r['micro_batch']} {unit} | "
                     f"{r['padding_fraction']:.2f} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / padded['tokens_per_s']:.2f}x |")
    return lines


def compute_lines(compute: list[dict]) -> list[str]:
    lines = ["forward + backward alone, 64 spread samples, real tokens per CPU second (one thread):", "",
             "| backbone | layout | micro-batches | padding fraction | tokens/CPU s | vs padded "
             "| without the LM head: tokens/CPU s | vs padded |", "|---|---|---|---|---|---|---|---|"]
    for r in compute:
        padded = next(b for b in compute if b["backbone"] == r["backbone"] and b["layout"] == "padded")
        lines.append(f"| {r['backbone']} | {r['layout']} | {r['micro_batches']} | {r['padding_fraction']:.2f} | "
                     f"{r['tokens_per_cpu_s']:.0f} | {r['tokens_per_cpu_s'] / padded['tokens_per_cpu_s']:.2f}x | "
                     f"{r['body_tokens_per_cpu_s']:.0f} | "
                     f"{r['body_tokens_per_cpu_s'] / padded['body_tokens_per_cpu_s']:.2f}x |")
    return lines


def main():
    import ray

    from benchmarks.encode import prepare
    from infra.local_ray import init_ray
    from infra.s3_server import start_s3, stop_s3

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", choices=PARTS, help="one part (default: all)")
    args = parser.parse_args()
    if args.steps < 2:  # the first step (compilation, warm-up) is left out of every time per step
        parser.error("--steps must be at least 2")
    parts = [args.only] if args.only else PARTS
    prepare()
    out = (Path(args.out) / "train-work").absolute()
    rows, lines = [], []
    if {"scaling", "allocator", "packing"} & set(parts):
        s3 = start_s3(out / "s3") if "scaling" in parts else None
        if s3:
            os.environ.update(s3.env())  # before Ray starts: its workers inherit the endpoint
            s3.create_bucket("bench")
        init_ray(local={"num_cpus": 3}, include_dashboard=False, log_to_driver=False)
        cache = digits_cache(out, args.steps) if {"scaling", "allocator"} & set(parts) else None
        if s3:
            scaling, waits, lines = scaling_cases(out, cache, args.steps)
            rows += scaling + waits
            stop_s3(s3)
        if "allocator" in parts:
            allocator, allocator_lines = allocator_cases(out, cache, args.steps)
            rows += allocator
            lines += ([""] if lines else []) + allocator_lines
        if "packing" in parts:
            packed, spread = packing_cases(out, args.steps)
            rows += packed
            lines += ([""] if lines else []) + packing_lines(packed, spread)
        ray.shutdown()
    if "compute" in parts:
        compute = compute_cases()
        rows += compute
        lines += ([""] if lines else []) + compute_lines(compute)
    machine = (f"{cpu_line()}, torch {torch.__version__}, "
               "1 CPU per worker")
    write_report(args.out, "train", machine, rows, lines)


if __name__ == "__main__":
    main()
