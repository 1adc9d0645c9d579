"""`modrwkv` command line: one entry point, a subcommand per job."""

import argparse
import sys
from pathlib import Path


def load_model(path: str, dtype: str):
    import torch

    from .model import RWKV7

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    p = Path(path)
    if p.is_dir():
        return RWKV7.from_pretrained(p, dtype=torch_dtype)
    return RWKV7.from_rwkv_pth(p, dtype=torch_dtype)


def cmd_convert(args) -> None:
    from .checkpoint import convert_fla_to_rwkv_pth, convert_rwkv_pth_to_fla

    if args.to == "fla":
        convert_rwkv_pth_to_fla(args.src, args.dst)
    else:
        convert_fla_to_rwkv_pth(args.src, args.dst)
    print(f"wrote {args.dst}")


def stream_generate(model, tokenizer, prompt: str, config) -> str:
    """Prints the continuation of `prompt` as it is generated; returns it."""
    from .generation import generate

    decoder = tokenizer.stream_decoder()
    pieces = []

    def show(_row: int, token: int) -> None:
        piece = decoder.push(token)
        pieces.append(piece)
        print(piece, end="", flush=True)

    generate(model, [tokenizer.encode(prompt, allow_special=True)], config, on_token=show)
    pieces.append(decoder.flush())
    print(pieces[-1])
    return "".join(pieces)


def cmd_generate(args) -> None:
    from .generation import GenerationConfig
    from .tokenizer import WorldTokenizer

    model = load_model(args.model, args.dtype)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    print(args.prompt, end="", flush=True)
    stream_generate(model, WorldTokenizer(), args.prompt, config)


def cmd_demo(args) -> None:
    from pipelines.demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modrwkv",
        description="ModRWKV: multimodal RWKV-7 — encode features, train phase I/II, evaluate, chat.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a backbone checkpoint between RWKV-LM .pth and fla's HF layout")
    p.add_argument("--to", choices=["fla", "rwkv"], required=True, help="target layout")
    p.add_argument("src", help="RWKV-LM .pth (--to fla) or an fla HF directory (--to rwkv)")
    p.add_argument("dst", help="output directory (--to fla) or .pth path (--to rwkv)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="continue a text prompt with a backbone checkpoint")
    p.add_argument("--model", required=True, help="RWKV-LM .pth or a save_pretrained directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the end-to-end demo on the embedded defaults (what `make demo` runs)")
    p.add_argument("--out", default="runs/demo", help="where the demo writes its model and outputs")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"modrwkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
