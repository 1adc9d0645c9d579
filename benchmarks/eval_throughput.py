"""`modrwkv eval`'s prediction loop on CPU: samples/s decoding one prompt at a time vs batches of prompts, with
fp32 and int8 weights, and each task's score beside (batching must not change it, forecasts beyond float32
rounding; int8 may, slightly).

Runs what the Predictor actor runs on each shard (`EvalTask.predict` over the cache's samples), in this
process, without Ray. Each setting runs `--repeats` times, the batch sizes interleaved within a round so that
load from other processes hits them alike; the fastest round counts (the first is also the warm-up).
Give a trained checkpoint and one test cache per task, e.g. the demo's:

    python benchmarks/eval_throughput.py --checkpoint runs/train/demo/phase2/model \\
        --task vqa=runs/cache/image-... --task asr=runs/cache/audio-... [--batch-sizes 1 16] [--out DIR]
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.report import cpu_line, write_report  # noqa: E402
from modrwkv.inference import prepare_for_inference  # noqa: E402
from modrwkv.multimodal import ModRWKV  # noqa: E402
from modrwkv.conversation import Sample  # noqa: E402
from modrwkv.tokenizer import WorldTokenizer  # noqa: E402
from pipelines.eval_tasks import TASKS  # noqa: E402
from preprocessing.cache.entry import FeatureCache  # noqa: E402


def measure(model, tokenizer, task_name: str, samples: list[list[Sample]], batch_sizes: list[int],
            repeats: int) -> list:
    """One result per batch size: the fastest of `repeats` rounds, its score and predictions."""
    tasks = [TASKS[task_name](batch_size=b) for b in batch_sizes]
    seconds = [float("inf")] * len(tasks)
    for _ in range(repeats):
        for i, task in enumerate(tasks):
            started = time.perf_counter()
            rows = [row for shard in samples for row in task.predict(model, tokenizer, shard)]
            seconds[i] = min(seconds[i], time.perf_counter() - started)
    results = []
    for task, batch_size, s in zip(tasks, batch_sizes, seconds):
        rows = [row for shard in samples for row in task.predict(model, tokenizer, shard)]
        metrics, _ = task.score(rows)
        results.append({"batch_size": batch_size, "samples": len(rows), "seconds": s, "samples_s": len(rows) / s,
                        **metrics, "predictions": [r["prediction"] for r in rows]})
    return results


def same_prediction(a, b) -> bool:
    """Answers equal; forecasts equal to float32 rounding (a batch's matrix products sum in another order)."""
    return a == b if isinstance(a, str) else bool(np.allclose(a, b, rtol=1e-4, atol=1e-5))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a ModRWKV save_pretrained folder")
    parser.add_argument("--task", action="append", required=True, metavar="TASK=CACHE",
                        help="a task (vqa, asr, forecast) and its test cache entry; repeatable")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--quantize", nargs="+", default=["none", "int8"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, results = WorldTokenizer(), []
    for quantization in args.quantize:
        model = prepare_for_inference(ModRWKV.from_pretrained(args.checkpoint), quantization=quantization)
        for spec in args.task:
            name, cache_uri = spec.split("=", 1)
            cache = FeatureCache(cache_uri)
            samples = [cache.read_shard(i) for i in range(len(cache.shards))]  # per shard, as the actor gets them
            for result in measure(model, tokenizer, name, samples, args.batch_sizes, args.repeats):
                results.append({"task": name, "quantize": quantization, **result})
                print({k: v for k, v in results[-1].items() if k != "predictions"}, flush=True)

    lines = ["| task | weights | batch | samples | samples/s | vs batch 1 | same predictions as batch 1, fp32 | "
             "score |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        first = next(b for b in results if b["task"] == r["task"] and b["quantize"] == r["quantize"])
        reference = next(b for b in results if b["task"] == r["task"])
        scores = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k not in (
            "task", "quantize", "batch_size", "samples", "seconds", "samples_s", "predictions"))
        same = sum(map(same_prediction, r["predictions"], reference["predictions"]))
        lines.append(f"| {r['task']} | {r['quantize']} | {r['batch_size']} | {r['samples']} | {r['samples_s']:.2f} | "
                     f"{r['samples_s'] / first['samples_s']:.2f}x | {same}/{r['samples']} | {scores} |")
    for r in results:
        r.pop("predictions")
    machine = (f"{cpu_line()}, torch {torch.__version__}, "
               f"{args.threads} threads")
    write_report(args.out, "eval_throughput", machine, results, lines)


if __name__ == "__main__":
    main()
