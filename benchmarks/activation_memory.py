"""What one training step keeps for its backward pass, with and without `gradient_checkpointing`: the peak memory a
forward + backward adds over the model, in bytes per token and per token per layer per channel (so that it scales
to other backbone shapes), and the step's time; in one run, each case in a fresh process (its peak RSS is its own).

The step is phase I's: the backbone frozen, the input embeddings (an adapter's output) trained, so the gradients
it adds are the inputs' only and the peak is the saved activations plus the backward's working set. The head is
left out (a loss on the last hidden states): the trainer runs it at labelled positions only, where it adds about
3 x vocabulary x 4 bytes per labelled token (logits, their softmax and its gradient), whatever the backbone. fp32,
on this machine's CPU, through the CPU's kernel backend; the 0.4B phase II step on an H200 in bf16 kept about 0.7x
of these bytes per token, layer and channel (docs/scale.md derives it).

    python benchmarks/activation_memory.py [--layers 4] [--width 512] [--tokens 1024 4096] [--out benchmarks/out]
"""

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the project's packages, not this folder's modules
    sys.path[0] = str(ROOT)

VOCAB = 65536
# glibc serves blocks of 128 KiB and more from mmap and returns them when freed, at a fixed threshold (its dynamic
# one keeps freed tensors on the heap), so the RSS follows the live tensors
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def reset_peak_rss() -> int:
    """Frees what the C heap holds unused, sets the peak RSS to the current one (Linux: clear_refs 5), returns it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """VmHWM: this process's peak RSS since the last reset."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def measure(layers: int, width: int, tokens: int, checkpointing: bool) -> dict:
    """One case, in this process: the peak added by a forward + backward over `tokens` tokens in one row."""
    import torch

    from modrwkv import RWKV7, RWKV7Config

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=VOCAB, n_layer=layers, n_embd=width, head_size=64)).init_weights()
    model.requires_grad_(False)
    model.gradient_checkpointing = checkpointing
    embeds = torch.randn(1, tokens, width, requires_grad=True)
    target = torch.randn(1, tokens, width)

    def step(n: int) -> None:
        hidden, _ = model.forward_hidden(inputs_embeds=embeds[:, :n])
        (hidden * target[:, :n]).mean().backward()

    step(64)  # a warm-up: first-use costs (thread pools, allocator arenas) out of the time and the peak
    embeds.grad = None
    before = reset_peak_rss()
    started = time.perf_counter()
    step(tokens)
    seconds = time.perf_counter() - started
    added = peak_rss_bytes() - before
    return {"layers": layers, "width": width, "tokens": tokens, "checkpointing": checkpointing, "seconds": seconds,
            "added_bytes": added, "bytes_per_token": added / tokens,
            "bytes_per_token_layer_channel": added / (tokens * layers * width)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case as JSON, run in a child process
    args = parser.parse_args()
    if args.case:
        print("CASE" + json.dumps(measure(**json.loads(args.case))))
        return

    from benchmarks.report import write_report
    from pipelines.environment import cpu_description

    rows = []
    for tokens in args.tokens:
        for checkpointing in (False, True):
            case = {"layers": args.layers, "width": args.width, "tokens": tokens, "checkpointing": checkpointing}
            done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                  text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT), **FIXED_MMAP})
            rows.append(json.loads(done.stdout.split("CASE")[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    lines = ["| tokens | checkpointing | step s | vs without | added MiB | KiB/token | "
             "bytes/(token x layer x channel) |", "|---|---|---|---|---|---|---|"]
    for without, with_ in zip(rows[::2], rows[1::2]):
        for r in (without, with_):
            lines.append(f"| {r['tokens']} | {'on' if r['checkpointing'] else 'off'} | {r['seconds']:.2f} | "
                         f"{r['seconds'] / without['seconds']:.2f}x | {r['added_bytes'] / 2**20:.0f} | "
                         f"{r['bytes_per_token'] / 1024:.1f} | {r['bytes_per_token_layer_channel']:.1f} |")
    import torch

    machine = (f"{cpu_description()}, {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}; "
               f"RWKV-7 L{args.layers} C{args.width}, head 64, vocab {VOCAB}, fp32, phase I step (backbone frozen)")
    write_report(args.out, "activation_memory", machine, rows, lines)


if __name__ == "__main__":
    main()
