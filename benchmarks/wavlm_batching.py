"""WavLM Base in a batch: each clip through the whole model alone, against the shipped `WavLMEncoder.forward`
(each clip's convolutions alone, then the projection and transformer over clips of about the same length,
right-padded and masked) at several `max_padding` settings (the padding a transformer batch may add, as a share of
its real frames: 0 batches only equal lengths, inf the whole batch).

WavLM Base and Base+ normalise their first convolution with a GroupNorm over the whole time axis, so a zero-padded
batch would give a clip features that depend on its batch-mates (off by 40 % of their scale): until 2026-12-05 the
encoder ran the whole model once per clip. Only the convolutions need that (about a third of the model's work);
this measures what batching the rest gains, and that the features stay those of the clip alone.

WavLM Base's real size (transformers' WavLMConfig defaults: hidden 768, 12 layers, 12 heads, conv channels 512,
94.4M parameters) with RANDOM weights (no model hub here; speed does not depend on the values), built with
save_pretrained and loaded through `preprocessing.encoders.build_encoder`. Clips (numpy seed 0): lengths drawn
uniformly from 2-17 s at 16 kHz (LibriSpeech's utterances: mostly 10-17 s, mean 12.3), so a batch pads unequal
lengths. Both ways time the model only (the host half, the waveform normalisation, is prepared once), after one
warm-up pass each, torch.cuda.synchronize around each timing on CUDA. The error column: the largest absolute
difference between a clip's two feature sequences, over the largest feature magnitude.

    python benchmarks/wavlm_batching.py [--device cuda|cpu] [--clips N] [--batch-size B] [--max-padding P ...]
                                        [--tiny] [--out DIR]

Defaults: CUDA bf16, 256 clips in batches of 32; CPU fp32, 16 clips in batches of 8. `--tiny`: one layer of width 32
(the test's path).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import WavLMConfig, WavLMModel

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

from benchmarks.report import cpu_line, write_report  # noqa: E402
from preprocessing.encoders import build_encoder  # noqa: E402
from preprocessing.items import SAMPLE_RATE, Audio  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synthetic_clips(count: int, rng) -> list[Audio]:
    seconds = rng.uniform(2.0, 17.0, count)
    return [Audio((0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32), SAMPLE_RATE)
            for s in seconds]


def measure(device: str, dtype: str, clips: int, batch_size: int, max_paddings: list[float], tiny: bool) -> list[dict]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model = WavLMModel(WavLMConfig(**(TINY if tiny else {}), feat_extract_norm="group"))
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        encoder = build_encoder("wavlm", folder, device=device, dtype=DTYPES[dtype])
    items = synthetic_clips(clips, np.random.default_rng(0))
    prepared = [encoder.inputs.prepare(item, str(i)) for i, item in enumerate(items)]
    batches = [prepared[i : i + batch_size] for i in range(0, len(prepared), batch_size)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    @torch.no_grad()
    def alone(batch):  # what the encoder did before: the whole model once per clip
        return [encoder.model(torch.from_numpy(p["wave"])[None].to(encoder.device, encoder.dtype))
                .last_hidden_state[0].float().cpu() for p in batch]

    def timed(forward) -> tuple[float, list]:
        forward(batches[0])  # warm-up
        sync()
        started = time.perf_counter()
        features = [f for batch in batches for f in forward(batch)]
        sync()
        return time.perf_counter() - started, features

    alone_seconds, reference = timed(alone)
    scale = max(float(r.abs().max()) for r in reference)
    audio_seconds = sum(p["wave"].size for p in prepared) / SAMPLE_RATE
    rows = []
    for max_padding in max_paddings:
        encoder.max_padding = max_padding
        seconds, features = timed(encoder.forward)
        rows.append({"model": "WavLM Base" + (" (tiny)" if tiny else ""), "parameters": parameters, "device": device,
                     "dtype": dtype, "clips": clips, "batch_size": batch_size, "audio_seconds": audio_seconds,
                     "max_padding": max_padding, "alone_clips_per_s": clips / alone_seconds,
                     "batched_clips_per_s": clips / seconds, "speedup": alone_seconds / seconds,
                     "max_error_over_scale": max(float((f - r).abs().max()) for f, r in zip(features, reference))
                     / scale, "same_lengths": all(f.shape == r.shape for f, r in zip(features, reference))})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clips", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--max-padding", type=float, nargs="+", default=[0.0, 0.25, float("inf")],
                        help="the encoder's max_padding settings to time (default: 0 0.25 inf)")
    parser.add_argument("--tiny", action="store_true", help="one layer of width 32 instead of WavLM Base's size")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    rows = measure(args.device, dtype, args.clips or (256 if cuda else 16), args.batch_size or (32 if cuda else 8),
                   args.max_padding, args.tiny)
    cpu = f"{cpu_line()}, {torch.get_num_threads()} threads"
    machine = (f"{torch.cuda.get_device_name() if cuda else f'CPU ({cpu})'}, torch {torch.__version__}, "
               f"transformers {transformers.__version__}; random weights, {dtype}")
    lines = ["| model | clips (audio s) | batch | each clip's whole model alone: clips/s | max_padding | shipped "
             "forward: clips/s | speedup | max error / scale |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['clips']} ({r['audio_seconds']:.0f}) | {r['batch_size']} | "
              f"{r['alone_clips_per_s']:.2f} | {r['max_padding']:g} | {r['batched_clips_per_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['max_error_over_scale']:.1e} |" for r in rows]
    write_report(args.out, "wavlm_batching", machine, rows, lines)


if __name__ == "__main__":
    main()
