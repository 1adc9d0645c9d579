"""`make demo`: the main job end to end on embedded defaults.

Today: train a tiny RWKV-7 from scratch (official init) on a text bundled with Python, save it HF-style,
load it back and let it continue a prompt, streaming. Later stages (encode, phase I/II, eval) join here.
"""

import codecs
import contextlib
import io
import time
from pathlib import Path

import torch

from modrwkv import RWKV7, RWKV7Config
from modrwkv.cli import print_piece
from modrwkv.generation import GenerationConfig, generate_text
from modrwkv.tokenizer import WorldTokenizer

from .text_pretrain import train_on_text, unigram_entropy

TINY = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=128, head_size=32)


def bundled_text() -> str:
    """The Zen of Python, as shipped (rot13-encoded) in the standard library's `this` module."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the poem
        import this
    return codecs.decode(this.s, "rot13")


def run_demo(out: Path, steps: int = 100) -> dict:
    started = time.time()
    torch.manual_seed(0)
    tokenizer = WorldTokenizer()
    text = bundled_text()
    ids = tokenizer.encode(text)
    print(f"[demo] text: the Zen of Python, {len(ids)} tokens; unigram entropy {unigram_entropy(ids):.3f} nats")

    model = RWKV7(TINY).init_weights()
    print(f"[demo] tiny RWKV-7: {TINY.n_layer} layers, width {TINY.n_embd}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    losses = train_on_text(model, ids, steps=steps, ctx_len=64, batch_size=4, progress=True)
    print(f"[demo] loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "backbone")
    reloaded = RWKV7.from_pretrained(out / "backbone")
    prompt = "Beautiful is better than"
    print(f"[demo] greedy continuation from the reloaded model:\n{prompt}", end="")
    completion = generate_text(reloaded, tokenizer, tokenizer.encode(prompt), GenerationConfig(max_new_tokens=40, temperature=0),
                               on_text=print_piece)
    print()
    summary = {"first_loss": losses[0], "last_loss": losses[-1], "completion": completion,
               "seconds": round(time.time() - started, 1)}
    print(f"[demo] done in {summary['seconds']} s; model at {out / 'backbone'}")
    return summary
