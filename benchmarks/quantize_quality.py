"""What quantized weights cost in quality: next-token top-1 agreement with fp32 and perplexity on held-out English
(Python's own documentation topics, `pydoc_data.topics`, which no model here was trained on; the stand-in read the
Zen of Python and digit words), for int8 and bf16 weights (`modrwkv.quantize`), on backbones given by path (e.g.
the demo's stand-in backbone, and the backbone of a trained ModRWKV) and on the 0.1B shape with random weights.

    python benchmarks/quantize_quality.py [--backbone runs/demo/backbone] [--modrwkv runs/train/demo/phase2/model]
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.backbone_cpu import SHAPE  # noqa: E402
from benchmarks.report import cpu_line, write_report  # noqa: E402
from modrwkv import RWKV7, RWKV7Config  # noqa: E402
from modrwkv.inference import prepare_for_inference  # noqa: E402
from modrwkv.multimodal import ModRWKV  # noqa: E402
from modrwkv.tokenizer import WorldTokenizer  # noqa: E402
from tests.conftest import random_backbone  # noqa: E402


def held_out_text() -> str:
    """English prose shipped with Python: its documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


@torch.no_grad()
def compare(name: str, load, ids: torch.Tensor) -> list[dict]:
    """fp32 vs each quantization of the model `load()` builds: top-1 agreement, perplexity, logit error."""
    reference = prepare_for_inference(load())(ids)[0][0]
    ppl = lambda logits: F.cross_entropy(logits[:-1], ids[0, 1:]).exp().item()  # noqa: E731
    rows = []
    for mode in ("int8", "bf16"):
        logits = prepare_for_inference(load(), quantization=mode)(ids)[0][0]
        rows.append({"model": name, "weights": mode, "tokens": ids.shape[1],
                     "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                     "ppl_fp32": ppl(reference), "ppl": ppl(logits),
                     "logit_rel_err": ((logits - reference).norm() / reference.norm()).item()})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", default=[], help="a backbone (.pth or folder); repeatable")
    parser.add_argument("--modrwkv", action="append", default=[], help="a ModRWKV folder: its backbone is measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1000, help="how much of the held-out text to score")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.tensor([WorldTokenizer().encode(held_out_text())[: args.tokens]])
    models = [(path, lambda p=path: RWKV7.from_pretrained(p)) for path in args.backbone]
    models += [(f"{path} (backbone)", lambda p=path: ModRWKV.from_pretrained(p).backbone) for path in args.modrwkv]
    models.append(("0.1B shape, random weights", lambda: random_backbone(RWKV7Config(**SHAPE))))
    results = [row for name, load in models for row in compare(name, load, ids)]
    lines = ["| model | weights | tokens | top-1 agreement with fp32 | perplexity fp32 | perplexity | change | "
             "logit rel. error |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights']} | {r['tokens']} | {100 * r['top1_agreement']:.1f}% | "
              f"{r['ppl_fp32']:.4g} | {r['ppl']:.4g} | {100 * (r['ppl'] / r['ppl_fp32'] - 1):+.2f}% | "
              f"{r['logit_rel_err']:.2%} |" for r in results]
    machine = (f"{cpu_line()}, torch {torch.__version__}, "
               f"{args.threads} threads")
    write_report(args.out, "quantize_quality", machine, results, lines)


if __name__ == "__main__":
    main()
