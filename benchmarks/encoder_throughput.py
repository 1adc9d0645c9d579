"""How fast the paper's frozen encoders encode, for the capacity plan: items/s, output tokens and bytes per item.

The paper's encode recipes (configs/paper/encode_llava_pretrain.yaml, encode_librispeech.yaml) run `siglip2`
(siglip2-base-patch16-naflex) on LLaVA images and `whisper` (whisper-small's encoder) on LibriSpeech, both bf16.
There is no model hub here, so each encoder is built at its REAL size with RANDOM weights from a transformers
config, saved with save_pretrained into a temporary folder and loaded through our own
`preprocessing.encoders.build_encoder`, as the encode job loads it: the time covers our code path (the processor:
resize + patchify, or the log-mel; the forward pass; the copy back to the CPU; our per-item slicing). Speed does
not depend on the values of the weights, pixels or samples, so these numbers are throughput only: the features
themselves mean nothing.

Real sizes (transformers' Siglip2VisionConfig defaults, documented as google/siglip2-base-patch16-naflex; the
encoder half of openai/whisper-small's config.json):
- siglip2 (92.9M parameters): hidden 768, 12 layers, 12 heads, MLP 3072, patch 16, num_patches 256 (the
  processor's max_num_patches: each image is resized, aspect kept, to at most 256 patches; our wrapper keeps the
  real ones, 252 for a 4:3 image).
- whisper (88.2M): d_model 768, 12 encoder layers, 12 heads, FFN 3072, 80 mel bins, 1500 source positions. The
  encoder always runs on the padded 30 s window (1500 positions); our wrapper keeps one token per 20 ms of audio.
`--tiny` shrinks both to one layer of width 32 (same items, same processors; 16 patches at most) for the test.

Items (numpy seed 0): RGB uint8 images of 640 x 480 (COCO's most common size; LLaVA's instruction images are
COCO's) and 12 s float32 mono clips at 16 kHz (LibriSpeech 960 h is 281,241 utterances: 12.3 s on average).
Under SigLIP2's patch budget the token count depends on the aspect ratio only, so the image size moves just the
resize cost. One batch of distinct items is generated and encoded again for every timed batch (memory stays flat).

Measured per encoder after one warm-up batch (CUDA: torch.cuda.synchronize around the timed batches): items/s of
`encode` in one process, and of its two halves apart: the host half (`inputs.prepare`: the processor's resize and
patchify, Whisper's log-mel) on one thread, as each of the encode job's Ray decode tasks runs it, and the batched
`forward` (the model); their ratio is how many decode tasks (CPUs) keep one forward busy. With N prepare processes
(default on CUDA: up to 8), the two overlapped as the encode job runs them: the forward fed by N spawned processes
running the host half, one thread each (the items pickled to and from them, as Ray's object store moves them
between decode tasks and actors). Then tokens L and width D
per item; the bytes per item a feature cache would store: fp16, L*D*2 (what ours writes), and 8-bit with one fp16
scale per token, L*D + L*2 (a formula, not an implementation); on CUDA the peak GPU memory (weights included), on
CPU items/s per core (torch.get_num_threads()).

    python benchmarks/encoder_throughput.py [--device cuda|cpu] [--items N] [--batch-size B] [--dtype D] [--out DIR]
    python benchmarks/encoder_throughput.py --device cpu --tiny --items 8    # seconds; the test runs this path

Defaults: CUDA bf16, batch 64, 512 images and 256 clips (sized for under a minute on an H200, the models' construction
included); CPU fp32, batch 8, 32 images and 16 clips (under a minute on 2 cores).
"""

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Siglip2ImageProcessorPil, Siglip2VisionConfig, Siglip2VisionModel, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

from benchmarks import prepare_workers  # noqa: E402
from benchmarks.report import cpu_line, write_report  # noqa: E402
from preprocessing.encoders import build_encoder  # noqa: E402
from preprocessing.items import SAMPLE_RATE, Audio  # noqa: E402

IMAGE_HEIGHT, IMAGE_WIDTH = 480, 640
CLIP_SECONDS = 12.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

REAL = {
    "siglip2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    patch_size=16, num_patches=256),
    "whisper": dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072,
                    num_mel_bins=80, max_source_positions=1500),
}
TINY = {  # same patch size, patch budget (scaled down) and mel/position counts: the items stay valid inputs
    "siglip2": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    patch_size=16, num_patches=16),
    "whisper": dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                    num_mel_bins=80, max_source_positions=1500),
}
MODEL_NAMES = {"siglip2": "siglip2-base-patch16-naflex", "whisper": "whisper-small encoder"}
ITEM_NAMES = {"siglip2": f"RGB uint8 {IMAGE_WIDTH}x{IMAGE_HEIGHT}", "whisper": f"{CLIP_SECONDS:g} s, 16 kHz"}


def save_random_siglip2(folder: Path, sizes: dict) -> int:
    """A vision tower and the image processor config a real naflex checkpoint ships (our wrapper reads it)."""
    model = Siglip2VisionModel(Siglip2VisionConfig(**sizes))
    model.save_pretrained(folder)
    processor = Siglip2ImageProcessorPil(patch_size=sizes["patch_size"], max_num_patches=sizes["num_patches"])
    processor.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def save_random_whisper(folder: Path, sizes: dict) -> int:
    """Encoder only, as our converters write it: the wrapper loads that without a decoder (it builds its own
    feature extractor from num_mel_bins)."""
    model = HFWhisperEncoder(WhisperConfig(**sizes))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def synthetic_images(count: int, rng) -> list[np.ndarray]:
    return [rng.integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8) for _ in range(count)]


def synthetic_clips(count: int, rng) -> list[Audio]:
    samples = int(CLIP_SECONDS * SAMPLE_RATE)
    return [Audio((0.1 * rng.standard_normal(samples)).astype(np.float32), SAMPLE_RATE) for _ in range(count)]


SAVERS = {"siglip2": save_random_siglip2, "whisper": save_random_whisper}
ITEMS = {"siglip2": synthetic_images, "whisper": synthetic_clips}


def measure(kind: str, tiny: bool, device: str, dtype: str, items: int, batch_size: int,
            prepare_processes: int = 0) -> dict:
    """Build, save and load `kind` (real or tiny); encode one warm-up batch, then `items // batch_size` timed ones;
    with `prepare_processes`, also the items fed to the forward by that many processes running the host half."""
    sizes = (TINY if tiny else REAL)[kind]
    batch_size = min(batch_size, items)
    batches = items // batch_size
    started = time.perf_counter()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        parameters = SAVERS[kind](Path(folder), sizes)
        encoder = build_encoder(kind, folder, device=device, dtype=DTYPES[dtype])
    build_seconds = time.perf_counter() - started
    batch = ITEMS[kind](batch_size, np.random.default_rng(0))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prepared = [encoder.inputs.prepare(item, str(i)) for i, item in enumerate(batch)]
    features = encoder.forward(prepared)  # warm-up: kernels chosen, allocator and thread pools up

    def timed(work) -> float:
        sync()
        started = time.perf_counter()
        for _ in range(batches):
            work()
        sync()
        return time.perf_counter() - started

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host half alone, on one thread: what one Ray decode task has (OMP_NUM_THREADS=1)
    prepare_seconds = timed(lambda: [encoder.inputs.prepare(item, str(i)) for i, item in enumerate(batch)])
    torch.set_num_threads(threads)
    forward_seconds = timed(lambda: encoder.forward(prepared))
    seconds = timed(lambda: encoder.encode(batch))
    pipelined_seconds = pipelined(encoder, batch, batches, prepare_processes, sync) if prepare_processes else None
    tokens, dim = features[0].shape  # every item has the same size, so the same token count
    result = {
        "encoder": kind, "model": MODEL_NAMES[kind] + (" (tiny)" if tiny else ""),
        "parameters": parameters, "item": ITEM_NAMES[kind], "device": device, "dtype": dtype,
        "batch_size": batch_size, "items_timed": batches * batch_size, "seconds": seconds,
        "items_per_s": batches * batch_size / seconds,
        "prepare_items_per_s_one_thread": batches * batch_size / prepare_seconds,
        "forward_items_per_s": batches * batch_size / forward_seconds,
        # decode tasks it takes to keep one forward busy: the CPUs a GPU encode actor needs beside it
        "prepare_threads_per_forward": prepare_seconds / forward_seconds,
        # the forward fed by `prepare_processes` processes running the host half, as the encode job feeds an actor
        "prepare_processes": prepare_processes,
        "pipelined_items_per_s": batches * batch_size / pipelined_seconds if pipelined_seconds else None,
        "tokens_per_item": tokens, "feature_dim": dim,
        "bytes_per_item_fp16": tokens * dim * 2, "bytes_per_item_8bit": tokens * dim + tokens * 2,
        "build_seconds": build_seconds,
    }
    if device == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["threads"] = torch.get_num_threads()
        result["items_per_s_per_core"] = result["items_per_s"] / result["threads"]
    return result


def pipelined(encoder, batch: list, batches: int, processes: int, sync) -> float:
    """Seconds for `batches` forwards of `batch` whose host half runs in `processes` worker processes meanwhile
    (workers started and warmed up before the clock starts)."""
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
    with ProcessPoolExecutor(processes, mp_context=context, initializer=prepare_workers.start,
                             initargs=(encoder.inputs,)) as pool:
        list(pool.map(prepare_workers.prepare, enumerate(batch * processes)))  # every worker up, imports done
        started, ready = time.perf_counter(), []
        for prepared in pool.map(prepare_workers.prepare, enumerate(batch * batches)):
            ready.append(prepared)
            if len(ready) == len(batch):
                encoder.forward(ready)
                ready = []
        sync()
        return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--items", type=int, default=None,
                        help="items timed per encoder (default: 512 images and 256 clips on CUDA, 32 and 16 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="one layer of width 32 instead of the real sizes")
    parser.add_argument("--prepare-processes", type=int, default=None, metavar="N",
                        help="also time the forward fed by N processes running the host half, as the encode job "
                             "feeds an actor (default: up to 8 on CUDA, one core left to the forward; 0 on CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    batch_size = args.batch_size or (64 if cuda else 8)
    processes = args.prepare_processes if args.prepare_processes is not None else (
        min(8, (os.cpu_count() or 2) - 1) if cuda else 0)
    # a clip costs several images' time (Whisper's forward covers 30 s whatever the clip): half as many suffice
    default_items = {"siglip2": 512, "whisper": 256} if cuda else {"siglip2": 32, "whisper": 16}
    started = time.perf_counter()
    rows = []
    for kind in ("siglip2", "whisper"):
        rows.append(measure(kind, args.tiny, args.device, dtype, args.items or default_items[kind], batch_size,
                            processes))
        print(f"[{time.perf_counter() - started:.0f}s] {rows[-1]}", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.empty_cache()
    cpu = f"{cpu_line()}, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name() if cuda else f"CPU ({cpu})"
    machine = (f"{where}, torch {torch.__version__}, transformers {transformers.__version__}; "
               f"{'tiny' if args.tiny else 'real-size'} encoders with random weights, {dtype}")
    lines = ["| encoder | item | batch | items timed | items/s | items/s/core | host half items/s, 1 thread | "
             "forward items/s | threads to feed the forward | fed by N processes: items/s | tokens x dim | "
             "KiB/item fp16 | KiB/item 8-bit | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_core = f"{r['items_per_s_per_core']:.2f}" if "items_per_s_per_core" in r else "-"
        peak = f"{r['peak_gpu_gib']:.1f}" if "peak_gpu_gib" in r else "-"
        fed = f"{r['prepare_processes']}: {r['pipelined_items_per_s']:.2f}" if r["prepare_processes"] else "-"
        lines.append(f"| {r['model']} | {r['item']} | {r['batch_size']} | {r['items_timed']} | "
                     f"{r['items_per_s']:.2f} | {per_core} | {r['prepare_items_per_s_one_thread']:.2f} | "
                     f"{r['forward_items_per_s']:.2f} | {r['prepare_threads_per_forward']:.2f} | {fed} | "
                     f"{r['tokens_per_item']} x {r['feature_dim']} | "
                     f"{r['bytes_per_item_fp16'] / 1024:.0f} | {r['bytes_per_item_8bit'] / 1024:.0f} | {peak} |")
    write_report(args.out, "encoder_throughput", machine, rows, lines)


if __name__ == "__main__":
    main()
