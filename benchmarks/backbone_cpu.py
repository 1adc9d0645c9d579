"""Backbone on CPU: ours vs the official `rwkv` package vs a same-size Llama, side by side in one run.

The 0.1B shape (12 layers, width 768, vocab 65536) with random weights; 2 threads. Prefill = tokens/s for a
prompt of T tokens with last-position logits (what the `rwkv` package computes by default); decode = tokens/s
of single-token steps on the state (or KV cache). Each measurement runs in its own process so its peak memory
(RSS above the loaded model) is its own. Ours is also measured with quantized weights (`modrwkv.quantize`:
int8 or bf16 linear weights, fp32 elsewhere) at the first length, against the package in fp32. Prints a table
and writes JSON.

    python benchmarks/backbone_cpu.py [--lengths 1024 4096 16384] [--bf16-lengths 1024] [--quantize int8 bf16]
        [--out DIR]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

from benchmarks.report import cpu_line, write_report  # noqa: E402
SHAPE = dict(vocab_size=65536, n_layer=12, n_embd=768, head_size=64)
DECODE_STEPS = 16


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Samples this process's resident memory every 2 ms while the block runs; .peak_mb is the highest."""

    def __enter__(self):
        self.peak_mb, self._running = rss_mb(), True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while self._running:
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def build_ours(dtype, quantization="none"):
    from modrwkv import RWKV7Config
    from modrwkv.inference import prepare_for_inference
    from tests.conftest import random_backbone

    return prepare_for_inference(random_backbone(RWKV7Config(**SHAPE)), dtype, quantization)


def run_case(case: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(case["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]
    T, impl, op = case["T"], case["impl"], case["op"]
    ids = torch.randint(0, SHAPE["vocab_size"], (T,), generator=torch.Generator().manual_seed(0))

    if impl.startswith("ours"):  # "ours", or "ours-int8" / "ours-bf16" with quantized weights
        model = build_ours(dtype, impl.partition("-")[2] or "none")
        warm = lambda: model(ids[None, :32], logits_to_keep=1)  # noqa: E731
        prefill = lambda: model(ids[None], logits_to_keep=1)  # noqa: E731

        def step(state):
            return model(ids[None, :1], state=state, logits_to_keep=1)[1]

    elif impl == "rwkv":
        os.environ["RWKV_V7_ON"] = "1"
        os.environ.setdefault("RWKV_JIT_ON", "1")
        from rwkv.model import RWKV

        model = RWKV(model=case["pth"][: -len(".pth")], strategy=f"cpu {case['dtype']}")
        tokens = ids.tolist()
        warm = lambda: model.forward(tokens[:32], None)  # noqa: E731
        prefill = lambda: model.forward(tokens, None)  # noqa: E731

        def step(state):
            return model.forward([tokens[0]], state)[1]

    else:  # a same-size Llama: 12 layers, width 768, 12 heads, MLP 2048 (12·C² per layer like RWKV-7)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=768, intermediate_size=2048,
                          num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                          max_position_embeddings=max(T, 32) + DECODE_STEPS + 8, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).to(dtype).eval()
        warm = lambda: model(ids[None, :32], use_cache=True, logits_to_keep=1)  # noqa: E731
        prefill = lambda: model(ids[None], use_cache=True, logits_to_keep=1)  # noqa: E731

        def step(cache):
            return model(ids[None, :1], cache=cache, use_cache=True, logits_to_keep=1).cache

    with torch.no_grad():
        warm()
        base = rss_mb()
        with PeakRSS() as peak:
            started = time.perf_counter()
            out = prefill()
            prefill_s = time.perf_counter() - started
        result = {**case, "prefill_tok_s": T / prefill_s, "peak_mb_above_model": peak.peak_mb - base}
        state = out.cache if impl == "llama" else out[1]
        result["state_mb"] = tensor_bytes(state) / 2**20  # what decoding carries: the RWKV state or the KV cache
        if op == "decode":
            state = step(state)
            started = time.perf_counter()
            for _ in range(DECODE_STEPS):
                state = step(state)
            result["decode_tok_s"] = DECODE_STEPS / (time.perf_counter() - started)
            result["decode_state_mb"] = tensor_bytes(state) / 2**20
    result.pop("pth", None)
    return result


def spawn(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside a state object (our RWKV7State, the package's list, a transformers cache)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "layers"):  # transformers' DynamicCache
        return sum(tensor_bytes([layer.keys, layer.values]) for layer in obj.layers)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v) for v in vars(obj).values())
    return 0


def fmt(r, key, digits=0):
    return f"{r[key]:.{digits}f}" if r and key in r else (r.get("error", "-")[:40] if r else "-")


def ratio(a, b, key):
    return f"{a[key] / b[key]:.2f}x" if a and b and key in a and key in b else "-"


def prefill_table(rows, args) -> list[str]:
    lines = ["| dtype | T | ours prefill tok/s | rwkv pkg tok/s | ours/pkg | Llama-SDPA tok/s | ours/Llama | "
             "ours peak MB | Llama peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    for dtype, lengths in (("fp32", args.lengths), ("bf16", args.bf16_lengths)):
        for T in lengths:
            o, p, l = rows.get(("ours", dtype, T)), rows.get(("rwkv", dtype, T)), rows.get(("llama", dtype, T))
            lines.append(f"| {dtype} | {T} | {fmt(o, 'prefill_tok_s')} | {fmt(p, 'prefill_tok_s')} | "
                         f"{ratio(o, p, 'prefill_tok_s')} | {fmt(l, 'prefill_tok_s')} | {ratio(o, l, 'prefill_tok_s')} | "
                         f"{fmt(o, 'peak_mb_above_model')} | {fmt(l, 'peak_mb_above_model')} |")
    return lines


def decode_table(rows, lengths) -> list[str]:
    """Decoding after a T-token prompt (fp32): what each model carries, and what decoding costs."""
    lines = ["| prompt T | ours decode tok/s | Llama decode tok/s | ours/Llama | RWKV state MiB | Llama KV cache MiB |",
             "|---|---|---|---|---|---|"]
    for T in lengths:
        o, l = rows.get(("ours", "fp32", T)), rows.get(("llama", "fp32", T))
        lines.append(f"| {T} | {fmt(o, 'decode_tok_s', 1)} | {fmt(l, 'decode_tok_s', 1)} | {ratio(o, l, 'decode_tok_s')} | "
                     f"{fmt(o, 'decode_state_mb', 2)} | {fmt(l, 'decode_state_mb', 0)} |")
    return lines


def package_decode_table(rows, args) -> list[str]:
    lines = ["| dtype | ours decode tok/s | rwkv pkg decode tok/s | ours/pkg |", "|---|---|---|---|"]
    for dtype, lengths in (("fp32", args.lengths), ("bf16", args.bf16_lengths)):
        if lengths:
            o, p = rows.get(("ours", dtype, lengths[0])), rows.get(("rwkv", dtype, lengths[0]))
            lines.append(f"| {dtype} | {fmt(o, 'decode_tok_s', 1)} | {fmt(p, 'decode_tok_s', 1)} | "
                         f"{ratio(o, p, 'decode_tok_s')} |")
    return lines


def quantized_table(rows, args) -> list[str]:
    """Ours with quantized linear weights vs fp32 weights and vs the package (fp32), at the first length."""
    T = args.lengths[0]
    base, pkg = rows.get(("ours", "fp32", T)), rows.get(("rwkv", "fp32", T))
    lines = [f"| weights | prefill tok/s (T={T}) | vs fp32 | vs pkg | decode tok/s | vs fp32 | vs pkg |",
             "|---|---|---|---|---|---|---|"]
    for name, r in [("fp32", base)] + [(q, rows.get((f"ours-{q}", "fp32", T))) for q in args.quantize]:
        lines.append(f"| {name} | {fmt(r, 'prefill_tok_s')} | {ratio(r, base, 'prefill_tok_s')} | "
                     f"{ratio(r, pkg, 'prefill_tok_s')} | {fmt(r, 'decode_tok_s', 1)} | "
                     f"{ratio(r, base, 'decode_tok_s')} | {ratio(r, pkg, 'decode_tok_s')} |")
    return lines


def plot(rows, lengths, path: Path) -> None:
    """Four panels over the prompt length (fp32): prefill time per token, prefill peak memory, the state or
    KV cache decoding carries, and decode speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"ours": "RWKV-7 (ours)", "rwkv": "RWKV-7 (rwkv package)", "llama": "Llama, same size (SDPA)"}
    panels = [("prefill_tok_s", "prefill ms per token", lambda v: 1000 / v, False),
              ("peak_mb_above_model", "prefill peak MB above the model", lambda v: v, False),
              ("decode_state_mb", "state / KV cache while decoding (MiB)", lambda v: v, True),
              ("decode_tok_s", "decode tokens/s", lambda v: v, False)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title, value, log_y) in zip(axes.flat, panels):
        for impl, label in names.items():
            points = [(T, value(r[key])) for T in lengths if (r := rows.get((impl, "fp32", T))) and key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set(title=title, xlabel="prompt tokens", xscale="log")
        if log_y:
            ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_xticks(lengths, [str(T) for T in lengths])
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--bf16-lengths", type=int, nargs="*", default=[1024],
                        help="bf16 prefill lengths (bf16 matmuls are emulated on AVX2-only CPUs: slow)")
    parser.add_argument("--quantize", nargs="*", default=["int8", "bf16"], choices=["int8", "bf16"],
                        help="quantized weights for ours, measured at the first length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(json.loads(args.one))))
        return

    import torch
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        pth = str(Path(tmp) / "rwkv7-0.1B-random.pth")
        torch.save(build_ours(torch.float32).state_dict(), pth)  # the same weights for ours and the package
        cases = []
        for dtype, lengths in (("fp32", args.lengths), ("bf16", args.bf16_lengths)):
            for T in lengths:
                for impl in ("ours", "rwkv", "llama"):
                    # decode after every prompt length for ours and Llama in fp32 (state vs growing KV cache);
                    # against the package, after the first length only
                    decode = (dtype == "fp32" and impl != "rwkv") or (T == lengths[0] and impl != "llama")
                    cases.append({"impl": impl, "dtype": dtype, "T": T, "op": "decode" if decode else "prefill",
                                  "threads": args.threads, "pth": pth})
        cases += [{"impl": f"ours-{q}", "dtype": "fp32", "T": args.lengths[0], "op": "decode", "threads": args.threads,
                   "pth": pth} for q in args.quantize]
        results = [spawn(c) for c in tqdm(cases, desc="benchmark cases")]

    rows = {(r["impl"], r["dtype"], r["T"]): r for r in results}
    lines = (prefill_table(rows, args) + [""] + decode_table(rows, args.lengths) + [""]
             + package_decode_table(rows, args) + [""] + quantized_table(rows, args))
    fp32 = [rows.get(("ours", "fp32", T)) for T in args.lengths]
    if len(fp32) > 1 and all(r and "prefill_tok_s" in r for r in fp32):
        lines.append(f"\nper-token prefill cost at T={args.lengths[-1]} vs T={args.lengths[0]} (ours, fp32): "
                     f"{fp32[0]['prefill_tok_s'] / fp32[-1]['prefill_tok_s']:.2f}x")
    plot(rows, args.lengths, Path(args.out) / "backbone_cpu.png")
    machine = f"{cpu_line()}, torch {torch.__version__}, {args.threads} threads"
    write_report(args.out, "backbone_cpu", machine, results, lines)


if __name__ == "__main__":
    main()
