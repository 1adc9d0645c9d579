"""The experiments behind the shipped defaults, re-runnable: each compares arms, each arm a quality suite's shipped
configs with `--set`-style overrides (of the train config, of its encode configs, of the data a suite builds),
trained by the training core in this process and scored as benchmarks/RESULTS.md quotes it: mean ± std over seeds
beside the suite's ceiling and baseline (`benchmarks/quality.py`'s suites, untracked), on each task's val split by
default (`--split test`: the test split, where the experiments before 2026-12-06 compared their arms; `--split
train`: the questions each arm trained on, a diagnostic of fit, where an arm at its ceiling memorised them).

    python benchmarks/experiments.py --list
    python benchmarks/experiments.py NAME [--seeds 0 1 2] [--split val|test|train] [--arms ARM ...] [--out DIR]

The table (arm × task and metric) is printed beside what RESULTS.md quoted for each arm, and written as NAME.md and
NAME.json under --out (default runs/experiments/NAME), where the arms' models and evaluations go too. Smoke runs:
`--steps N` trains every phase N steps without warmup (the figures then mean nothing); `--set KEY=VALUE` overrides
every arm's train config (a backbone elsewhere); `--caches FILE` gives the demo's caches as `quality.py
--write-caches` wrote them, for a machine without the data or encoders (arms that change an encode config cannot use
it; it holds the train and test caches: with `--split test` or `train`), or as a JSON of encode YAML -> entry of
your own.

Most experiments ran before today's code (RESULTS.md says when); what the configs cannot say of the original runs
is in each entry's `differs`, and the figures may differ by it.
"""

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the project's packages, not this folder's modules
    sys.path[0] = str(ROOT)

from benchmarks import quality  # noqa: E402
from benchmarks.quality import (DEMO_EVALS, SPLITS, SUITE_CONFIGS, Variant, encode_overrides, fmt,  # noqa: E402
                                split_yaml)
from benchmarks.report import write_report  # noqa: E402


@dataclass(frozen=True)
class Suite:
    run: Callable  # (seeds, tracking_uri, variant) -> rows, as quality.py's suites
    train_config: str
    eval_configs: tuple[str, ...]


SUITES = {name: Suite(run, *SUITE_CONFIGS[name]) for name, run in quality.SUITES.items()}
# the demo's recipe scored on CO2 alone, for arms that train on its series cache alone
SUITES["co2"] = Suite(partial(quality.demo_suite, tasks=("CO2 forecast",)), SUITE_CONFIGS["demo"][0],
                      (DEMO_EVALS["CO2 forecast"],))


@dataclass(frozen=True)
class Arm(Variant):
    """One side of a comparison: a Variant and what RESULTS.md quoted for it."""

    quoted: str = ""


@dataclass(frozen=True)
class Experiment:
    name: str
    decides: str
    chose: str  # the shipped default, as the config or code says it
    results: tuple[str, ...]  # the RESULTS.md lines it re-runs, by the bold words they open with
    suite: str
    arms: tuple[Arm, ...]
    setting: Variant = field(default_factory=Variant)  # what every arm shares: the recipe of the time
    differs: str = ""  # what the configs cannot say of the original runs


def arm_variant(experiment: Experiment, arm: Arm, extra: dict) -> Variant:
    """The arm's overrides over the experiment's setting, then `extra` (--steps, --set) over the train config."""
    base = experiment.setting
    encode = {yaml: {**base.encode.get(yaml, {}), **arm.encode.get(yaml, {})} for yaml in {**base.encode, **arm.encode}}
    data = {name: {**base.data.get(name, {}), **arm.data.get(name, {})} for name in {**base.data, **arm.data}}
    return Variant(f"{experiment.name}-{arm.name}", {**base.train, **arm.train, **extra}, encode, data)


# ---- the registry: the settings of the time, then one entry per experiment -----------------------------------
SHAPES_ENCODES = tuple(f"configs/quality/encode_shapes_{split}.yaml" for split in SPLITS)
LAST_LAYER = {yaml: {"encoder.layer": None} for yaml in SHAPES_ENCODES}
COMPRESSED = {"model.projectors.image.kernel": 5, "model.projectors.image.stride": 4}  # 65 DINOv2 tokens -> 16
# the shapes set before it grew: 2,000 training images, 500 test questions (100 a type), as many val questions
SHAPES_2000 = {"n_train": 2000, "n_val": 500, "n_test": 500}
# the first shapes recipe: one question an image, the last layer's tokens, compressed, phase II 300 steps
FIRST_SHAPES = Variant(train={"phase2.steps": 300, **COMPRESSED}, encode=LAST_LAYER,
                       data={"shapes": {**SHAPES_2000, "extra_yesno": 0}})
FIRST_SHAPES_TEST = ("the test questions are the first 500 of today's test split, not the 500 then drawn after the "
                     "training images (the generator changed when the split grew to 2,500); same kinds, same size")
# the demo's recipe before 2026-12-05's digits-recipe (phase I 300 steps, phase II at 5e-4 since)
# the demo's recipe before 2026-12-07's adapter decay (phase I's weight decay 1.0 since), and before that day's
DEMO_BEFORE_ADAPTER_DECAY = {"phase1.weight_decay": 0.0}
DEMO_BEFORE_DIGITS_RECIPE = {"phase1.steps": 150, "phase1.checkpoint_every": 75, "phase2.lr": 1.0e-3,
                             **DEMO_BEFORE_ADAPTER_DECAY}
LARGER_SET = ("the single-process figures were on a separate 2,500-question test set (`modrwkv data shapes --train "
              "0 --test 2500 --seed 11`); the arms here are scored on the shipped 2,500-question test split")


def standardized_or_whitened(modality: str, encoder: str, suite: str, standardized: str, whitened: str,
                             differs: str, setting: Variant = Variant()) -> Experiment:
    """The per-modality choice that whitening every modality in the pipeline made (image whiten, the rest
    standardize): this modality's projector standardised (shipped) or whitened, the others as shipped."""
    return Experiment(
        f"{modality}-normalisation", f"how {modality} ({encoder}) features are normalised: per dimension or whitened",
        f"{modality} projectors standardize (DEFAULT_NORMALIZE, modrwkv/multimodal.py)",
        ("Pipeline, 3 seeds, every modality whitened",), suite,
        (Arm("standardize", quoted=standardized),
         Arm("whiten", train={f"model.projectors.{modality}.normalize": "whiten"}, quoted=whitened)),
        setting, differs)


def series_encoder(suite: str, encode_yaml: str, layers: int, fracast: str, quoted: tuple[str, str],
                   setting: Variant = Variant()) -> Experiment:
    """The paper's series encoder against the shipped one: WaveNet trained from scratch with the adapter on the raw
    (per-window z-scored) series, or the frozen Fracast-0's features; `layers` sets WaveNet's receptive field
    (2^layers steps) to cover the suite's lookback. The adapter is the suite's in both arms (the paper's 4x is the
    third arm); `quoted`: what RESULTS.md quotes for those two."""
    raw = {encode_yaml.format(split): {"encoder.kind": "raw", "encoder.model_dir": None} for split in SPLITS}
    wavenet = {"model.wavenet": {"hidden": 64, "layers": layers}}
    return Experiment(
        "series-encoder" + ("" if suite == "elnino" else f"-{suite}"),  # the demo's: CO2 beside digits and speech
        f"which encoder the {suite} series go through: the frozen Fracast-0 (cached features) or a WaveNet trained "
        "from scratch with the adapter (the paper's Table 4)", "encoder.kind: fracast in " + encode_yaml.format("*"),
        ("Series encoder: WaveNet trained from scratch",), suite,
        (Arm("fracast", quoted=fracast), Arm("wavenet", encode=raw, train=wavenet, quoted=quoted[0]),
         Arm("wavenet-adapter-4x", encode=raw, train={**wavenet, "model.projectors.series.adapter_scale": 4},
             quoted=quoted[1])),
        setting, "none: every arm is today's code and data, in one process")


EXPERIMENTS = {e.name: e for e in [
    Experiment(
        "forecast-skip", "whether a forecast adds a linear map of the normalised lookback (starting as the naive "
        "forecast) to the head, which starts at zero", "model.forecast_skip: true",
        ("Forecast head alone vs head + lookback skip",), "co2",
        (Arm("head-alone-unnormalised", train={"model.forecast_skip": False,
                                               "model.projectors.series.normalize": "none"},
             quoted="CO2 MSE 0.688 ± 0.093 ppm² (ridge 0.245, seasonal naive 3.41)"),
         Arm("skip-unnormalised", train={"model.projectors.series.normalize": "none"},
             quoted="CO2 MSE 0.337 ± 0.021 ppm²"),
         Arm("head-alone", train={"model.forecast_skip": False}, quoted="not measured (features standardised since)"),
         Arm("skip", quoted="not measured (the shipped recipe on the CO2 cache alone)")),
        Variant(train={"caches": ["configs/demo/encode_co2_train.yaml"], "phase1.mix": None, "phase2.mix": None,
                       "phase1.steps": 40, "phase2.steps": 40, "phase2.lr": 1.0e-3, **DEMO_BEFORE_ADAPTER_DECAY}),
        "then the series features were not normalised (the '-unnormalised' arms; standardisation came after), and "
        "training read the forecast after 'User: …\\n\\n' where evaluation read it after 'Assistant:' (fixed since: "
        "'Forecast read at a different position'); which position the script of the time evaluated is not recorded"),
    Experiment(
        "image-normalisation", "how image features are normalised before the projector: not at all, per dimension, "
        "or ZCA-whitened (ε 0.01 or 0.1 of the mean eigenvalue)",
        "image projectors whiten (DEFAULT_NORMALIZE, modrwkv/multimodal.py), model.whiten_eps 0.1",
        ("Single-process baseline", "Per-dimension standardisation of the features before the projector",
         "ZCA whitening instead of per-dimension standardisation", "Pipeline, 3 seeds, every modality whitened"),
        "shapes",
        (Arm("none", train={"model.projectors.image.normalize": "none"},
             quoted="colour 0.183 ± 0.045, shape 0.76 ± 0.11, yes/no 0.59 ± 0.02, count 0.96, position 0.99"),
         Arm("standardize", train={"model.projectors.image.normalize": "standardize"},
             quoted="colour 0.46 ± 0.03, shape 0.99 ± 0.01, count 0.92, yes/no 0.58"),
         Arm("whiten-eps-0.01", train={"model.projectors.image.normalize": "whiten", "model.whiten_eps": 0.01},
             quoted="colour 0.847 ± 0.034, shape 1.00, count 0.89, position 0.96, yes/no 0.57"),
         Arm("whiten", quoted="colour 0.857 ± 0.045, shape 0.99, count 0.92, position 0.99, yes/no 0.59")),
        FIRST_SHAPES, FIRST_SHAPES_TEST),
    standardized_or_whitened(
        "audio", "Whisper", "demo", "WER 0.046 ± 0.065, CER 0.037 ± 0.013 (every modality standardised)",
        "WER 0.222 ± 0.039, CER 0.176 ± 0.035 (every modality whitened)",
        "then 96 training utterances and 24 test ones, trained by Ray Train on 2 workers, and each arm normalised every "
        "modality alike; here today's 384 / 48 utterances, one process, and only the audio projector differs",
        Variant(train=DEMO_BEFORE_DIGITS_RECIPE)),
    standardized_or_whitened(
        "series", "Fracast", "elnino",
        "El Nino MSE 1.202 ± 0.018 (every modality standardised; the quality table since: 1.142 ± 0.037)",
        "El Nino MSE 1.337 ± 0.066 (every modality whitened)",
        "the pipeline's runs (Ray Train, 2 workers); here one process. The line's CO2 figures (0.339 -> 0.324 ± "
        "0.015, whitened better there) came from the demo suite with every modality whitened, which no arm here runs"),
    Experiment(
        "encoder-layer", "which DINOv2 layer's tokens the shapes set caches: the last, or layer 8",
        "encoder.layer: 8 in configs/quality/encode_shapes_*.yaml", ("The model on layer 8's tokens",), "shapes",
        (Arm("last-layer", encode=LAST_LAYER,
             quoted="colour 0.880 ± 0.036 (0.83 / 0.91 / 0.90), count 0.86 / 0.91 / 0.90, yes/no 0.58 / 0.58 / 0.60"),
         Arm("layer-8", quoted="colour 0.910 ± 0.016 (0.89 / 0.91 / 0.93), count 0.917, yes/no 0.56 / 0.57 / 0.60")),
        Variant(train=FIRST_SHAPES.train, data=FIRST_SHAPES.data), FIRST_SHAPES_TEST),
    Experiment(
        "extra-yesno", "whether each training image is asked one yes/no question more about its own shapes "
        "(phase II 1,200 steps, so that each question is seen as often)",
        "build_shapes(extra_yesno=1) (preprocessing/shapes_data.py)",
        ("G7's data, phase II 1,200 steps", "G9 shipped, pipeline, 3 seeds"), "shapes",
        (Arm("one-question", data={"shapes": {"extra_yesno": 0}},
             quoted="seed 0: colour 0.96, count 0.90, yes/no 0.58 (1.00 on training questions)"),
         Arm("one-yesno-more", data={"shapes": {"yesno_turns": 1}},
             quoted="colour 0.957 ± 0.021, yes/no 0.823 ± 0.038, count 0.937, position 0.987, shape 1.00 (on images "
                    "drawn afresh); on these images seeds 0 / 1: yes/no 0.84 / 0.83, colour 0.93 / 0.96; pipeline: "
                    "colour 0.980 ± 0.014, yes/no 0.867 ± 0.033")),
        Variant(train={"phase2.steps": 1200, **COMPRESSED}, data={"shapes": SHAPES_2000}),
        "the single-process line drew 2,000 new training images; the shipped set kept its images and drew the extra "
        "questions from a generator of their own (the arms here). " + FIRST_SHAPES_TEST),
    Experiment(
        "shapes-recipe", "the shapes set's size, phase II's length and the image projector's compression",
        "8,000 training images (build_shapes), phase2.steps: 2400 and no compression in "
        "configs/quality/train_shapes.yaml",
        ("Four times the training images", "Four times, no Conv1D compression", "G21 shipped, pipeline, 3 seeds"),
        "shapes",
        (Arm("2000-images-1200-steps-compressed", train={"phase2.steps": 1200, **COMPRESSED},
             data={"shapes": {"n_train": 2000}},
             quoted="seed 0: yes/no 0.830 (the larger set); pipeline on 500 questions 0.867 ± 0.033"),
         Arm("8000-images-1200-steps-compressed", train={"phase2.steps": 1200, **COMPRESSED},
             quoted="seed 0: yes/no 0.894 (the larger set)"),
         Arm("8000-images-2400-steps-compressed", train=COMPRESSED,
             quoted="seeds 0 / 1: yes/no 0.922 / 0.904 (the larger set)"),
         Arm("8000-images-2400-steps", quoted="seeds 0 / 1 / 2: yes/no 0.948 / 0.914 / 0.910 = 0.924 ± 0.017 (the "
                                              "larger set); pipeline 0.935 ± 0.002 on the shipped split")),
        Variant(data={"shapes": {"yesno_turns": 1}}),  # one yes/no question in the extra record, as then
        LARGER_SET + "; the pipeline figures are Ray Train's, 2 workers"),
    Experiment(
        "yesno-data", "how many yes/no questions each training image's extra record asks: one, three in turn, or "
        "three per shape drawn", "build_shapes(yesno_per_shape=3) (preprocessing/shapes_data.py)",
        ("G24's seed 2", "G25's three seeds"), "shapes",
        (Arm("one", data={"shapes": {"yesno_turns": 1}},
             quoted="yes/no 0.935 ± 0.002 (0.936 / 0.938 / 0.932)"),
         Arm("three-in-turn", data={"shapes": {"yesno_turns": 3}},
             quoted="yes/no 0.949 ± 0.009 (0.962 / 0.940 / 0.946)"),
         Arm("three-per-shape", quoted="yes/no 0.967 ± 0.012 (0.950 / 0.976 / 0.974), colour 0.999 ± 0.001, count "
                                       "0.987 ± 0.005, position 0.999 ± 0.002, shape 1.000")),
        differs="the pipeline's runs (Ray Train, 2 workers, 20-35 minutes a seed); here one process"),
    Experiment(
        "speech-utterances", "how many spoken-digit utterances the demo trains on: 96 or 384 (the same 150 steps)",
        "SPEECH_SIZES: 384 training utterances (preprocessing/demo_data.py)",
        ("Four times the training utterances",), "demo",
        (Arm("96-utterances", data={"speech": {"n_train": 96, "n_val": 48, "n_test": 48}},
             quoted="WER 0.000 / 0.292 / 0.014, CER 0.014 / 0.222 / 0.014; digits 0.773 ± 0.005, CO2 0.324 ± 0.013"),
         Arm("384-utterances", quoted="WER 0.000 / 0.000 / 0.000, CER 0.000 / 0.000 / 0.000; digits 0.790 ± 0.029, "
                                      "CO2 0.328 ± 0.019")),
        Variant(train=DEMO_BEFORE_DIGITS_RECIPE),
        "the pipeline's runs (Ray Train, 2 workers), on the speech splits of the time, which shared test strings "
        "with training (held out since 2026-12-05); here one process, which draws the caches in another order "
        "(RESULTS.md, 'Training core')"),
    Experiment(
        "digits-recipe", "how the demo's recipe trains digits steadily across seeds, now that the other tasks' draws "
        "move it (0.71 to 0.81 over five seeds): phase I twice as long, phase II's lr halved, or phase II drawing "
        "digits 3:1:1, or both of the first two", "phase1.steps: 300, phase2.lr: 5.0e-4 (configs/demo/train.yaml)",
        ("The demo's digits over ten seeds",), "demo",
        (Arm("before", train=DEMO_BEFORE_DIGITS_RECIPE,
             quoted="one process, seeds 0-4 / 5-9: digits 0.772 ± 0.054 / 0.738 ± 0.039; pipeline, seeds 0-4: "
                    "0.766 ± 0.039 (0.71 / 0.80 / 0.78 / 0.81 / 0.73), WER 0, CER 0.003 ± 0.006, CO2 0.328 ± 0.020"),
         Arm("phase1-300-steps", train={"phase2.lr": 1.0e-3}, quoted="one process, seeds 0-4: digits 0.780 ± 0.033"),
         Arm("phase2-lr-5e-4", train={"phase1.steps": 150, "phase1.checkpoint_every": 75},
             quoted="one process, seeds 0-4: digits 0.798 ± 0.039, WER 0.022 ± 0.038"),
         Arm("phase2-mix-3-1-1", train={**DEMO_BEFORE_DIGITS_RECIPE, "phase2.mix": [3, 1, 1]},
             quoted="one process, seeds 0-4: digits 0.766 ± 0.023"),
         Arm("shipped", quoted="one process, seeds 0-4 / 5-9: digits 0.790 ± 0.046 / 0.786 ± 0.029"),
         Arm("phase1-600-steps", train={"phase1.steps": 600, "phase1.checkpoint_every": 300},
             quoted="val, seeds 0-2 (2026-12-07): digits 0.800 ± 0.026; shipped 0.780 ± 0.020, beside the "
                    "all-token probe's 0.89")),
        Variant(train=DEMO_BEFORE_ADAPTER_DECAY),
        differs="none: every arm is today's code and data, in one process; the pipeline's figures (Ray Train, 2 "
        "workers) draw the caches in another order (RESULTS.md, 'Training core')"),
    Experiment(
        "digits-compression", "whether the demo's image projector compresses DINOv2's 65 tokens (Conv1D kernel 5, "
        "stride 4: 16 positions) or reads all 65 as the digits probe does (its ceiling since 2026-12-07: 0.89 on "
        "val, 0.83 on test, where the pooled probe had 0.67 / 0.72)",
        "model.projectors.image: kernel 5, stride 4 (configs/demo/train.yaml)",
        ("2026-12-07: the digits' image tokens uncompressed",), "demo",
        (Arm("kernel-5-stride-4", quoted="val, seeds 0-2: digits 0.780 ± 0.020, CO2 0.383 ± 0.002"),
         Arm("uncompressed", train={"model.projectors.image.kernel": 0, "model.projectors.image.stride": 0},
             quoted="val, seeds 0-2: digits 0.773 ± 0.040, CO2 0.375 ± 0.008")),
        Variant(train=DEMO_BEFORE_ADAPTER_DECAY), "none: new on 2026-12-07, before the adapter decay"),
    Experiment(
        "adapter-decay", "phase I's weight decay on the demo's trainable matrices (the projectors' adapters and "
        "compression, the forecast head and skip; AdamW, decoupled): none, 0.1 or 1.0",
        "phase1.weight_decay: 1.0 (configs/demo/train.yaml)", ("2026-12-07: phase I's weight decay",), "demo",
        (Arm("none", train=DEMO_BEFORE_ADAPTER_DECAY,
             quoted="val, seeds 0-2: digits 0.780 ± 0.020, CO2 0.383 ± 0.002, WER 0, CER 0.005 ± 0.008"),
         Arm("decay-0.1", train={"phase1.weight_decay": 0.1},
             quoted="val, seeds 0-2: digits 0.803 ± 0.067, CO2 0.364 ± 0.007, WER 0, CER 0.009 ± 0.008"),
         Arm("decay-1", quoted="val, seeds 0-2: digits 0.787 ± 0.006, CO2 0.280 ± 0.005, WER 0, CER 0.005 ± 0.008")),
        differs="none: new on 2026-12-07"),
    Experiment(
        "phase2-steps", "whether the demo's digits, under the all-token probe's 0.89 on val, gain from phase II "
        "twice as long (the backbone and adapter adapting to the image tokens; phase I twice as long tied)",
        "phase2.steps: 150 (configs/demo/train.yaml)", ("2026-12-07: phase II twice as long",), "demo",
        (Arm("shipped", quoted="val, seeds 0-2, one process: digits 0.817 ± 0.032, CO2 0.296 ± 0.013, WER 0, CER "
                                "0.005 ± 0.008"),
         Arm("phase2-300-steps", train={"phase2.steps": 300, "phase2.checkpoint_every": 150},
             quoted="val, seeds 0-2, one process: digits 0.817 ± 0.050, CO2 0.288 ± 0.009, WER 0, CER 0")),
        differs="none: new on 2026-12-07"),
    Experiment(
        "digits-generalisation", "what holds the demo's digits under the all-token probe (val 0.82 against 0.89) "
        "where every seed answers its 256 training images all right (`--split train`: 1.000): the image features "
        "whitened less or more, or standardised per dimension instead, or the adapters' weight decay stronger",
        "image projectors whiten, model.whiten_eps 0.1 (modrwkv/multimodal.py, pipelines/train_config.py); "
        "phase1.weight_decay 1.0 (configs/demo/train.yaml)", ("2026-12-07: the digits' generalisation gap",), "demo",
        (Arm("shipped", quoted="val, seeds 0-5, one process: digits 0.818 ± 0.035, CO2 0.294 ± 0.009, WER 0; train "
                               "split, seeds 0-2: digits 1.000, CO2 0.221 ± 0.002"),
         Arm("whiten-eps-0.01", train={"model.whiten_eps": 0.01},
             quoted="val, seeds 0-2: digits 0.820 ± 0.035, CO2 0.301 ± 0.017"),
         Arm("whiten-eps-1", train={"model.whiten_eps": 1.0},
             quoted="val, seeds 0-2: digits 0.757 ± 0.055, CO2 0.301 ± 0.028"),
         Arm("standardize", train={"model.projectors.image.normalize": "standardize"},
             quoted="val, seeds 0-2: digits 0.770 ± 0.035, CO2 0.305 ± 0.022"),
         Arm("phase1-decay-4", train={"phase1.weight_decay": 4.0},
             quoted="val, seeds 0-5: digits 0.778 ± 0.058, CO2 0.258 ± 0.010; train split, seeds 0-2: digits "
                    "1.000, CO2 0.244 ± 0.001"),
         Arm("phase1-decay-16", train={"phase1.weight_decay": 16.0},
             quoted="val, seeds 0-2: digits 0.737 ± 0.025, CO2 0.317 ± 0.026")),
        differs="none: new on 2026-12-07"),
    Experiment(
        "feature-precision", "how the feature store holds each vector: fp16, or int8 with its own scale (half the "
        "bytes; preprocessing/cache/precision.py)", "cache.precision: fp16 (pipelines/encode_config.py)",
        ("The feature store in 8 bits",), "demo",
        (Arm("fp16", quoted="the shipped store; one process: digits 0.770 ± 0.014, WER 0.005 ± 0.007, CER 0, CO2 "
                            "0.319 ± 0.001 ('Training core')"),
         Arm("int8", encode={f"configs/demo/encode_{task}_{split}.yaml": {"cache.precision": "int8"}
                             for task in ("digits", "speech", "co2") for split in SPLITS},
             quoted="new")),
        Variant(train=DEMO_BEFORE_DIGITS_RECIPE), "the quoted fp16 figures (2026-12-04) predate the speech test "
        "split held out of training (2026-12-05), which moved digits: compare the two arms of one run"),
    Experiment(
        "feature-precision-elnino", "the El Nino suite's Fracast features stored in fp16 or in int8 (the other "
        "series suite; the demo's CO2 is in feature-precision)", "cache.precision: fp16 (pipelines/encode_config.py)",
        ("The feature store in 8 bits",), "elnino",
        (Arm("fp16", quoted="the shipped store; Ray Train: El Nino MSE 1.142 ± 0.037 ('Learning quality', "
                            "2026-12-01)"),
         Arm("int8", encode={f"configs/quality/encode_elnino_{split}.yaml": {"cache.precision": "int8"}
                             for split in SPLITS}, quoted="new")),
        differs="the quoted fp16 figure is the pipeline's (Ray Train, 2 workers); both arms here run in one process"),
    Experiment(
        "feature-precision-shapes", "the shapes suite's DINOv2 features (layer 8) stored in fp16 or in int8: colour "
        "lives in low-variance directions, the likeliest to lose to 8 bits", "cache.precision: fp16 "
        "(pipelines/encode_config.py)", ("The feature store in 8 bits",), "shapes",
        (Arm("fp16", quoted="the shipped store; Ray Train: yes/no 0.967 ± 0.012, colour 0.999 ± 0.001, count 0.987 ± "
                            "0.005 ('G25's three seeds')"),
         Arm("int8", encode={f"configs/quality/encode_shapes_{split}.yaml": {"cache.precision": "int8"}
                             for split in SPLITS}, quoted="three seeds: colour 0.999 ± 0.001, count 0.991 ± "
                                                                     "0.004, yes/no 0.968 ± 0.009")),
        differs="the quoted fp16 figures are the pipeline's (Ray Train, 2 workers); both arms here run in one process"),
    series_encoder("elnino", "configs/quality/encode_elnino_{}.yaml", layers=6,
                   fracast="one process, seeds 0-5: El Nino MSE 1.210 ± 0.042 (Ray Train: 1.142 ± 0.037)",
                   quoted=("seeds 0-5: 1.218 ± 0.060", "seeds 0-5: 1.248 ± 0.031")),
    series_encoder("co2", "configs/demo/encode_co2_{}.yaml", layers=7,
                   fracast="seeds 0-2: CO2 MSE 0.336 ± 0.018",
                   quoted=("seeds 0-2: 0.298 ± 0.003", "seeds 0-2: 0.284 ± 0.003"),
                   setting=Variant(train={"caches": ["configs/demo/encode_co2_train.yaml"], "phase1.mix": None,
                                          "phase2.mix": None, **DEMO_BEFORE_ADAPTER_DECAY})),
    series_encoder("demo", "configs/demo/encode_co2_{}.yaml", layers=7,
                   fracast="seeds 0-2: CO2 MSE 0.304 ± 0.007, digits 0.827 ± 0.009, WER 0, CER 0",
                   quoted=("not run", "seeds 0-2: CO2 MSE 0.314 ± 0.007, digits 0.800 ± 0.008, WER 0, CER 0"),
                   setting=Variant(train=DEMO_BEFORE_ADAPTER_DECAY)),
]}


# ---- resolving and running ------------------------------------------------------------------------------------
def resolve(experiment: Experiment) -> None:
    """Loads every config the experiment would run, with each arm's overrides, building and training nothing: the
    suite's train config, the encode configs it and the suite's eval configs read, and the data builders' keywords
    against their signatures; an arm's overrides of an eval's test cache must be its val twin's too (both splits
    encoded alike). Raises on the first that does not resolve."""
    from pipelines.config import ConfigError, load_config
    from pipelines.encode import EncodeConfig
    from pipelines.evaluate import EvalConfig
    from pipelines.train_config import TrainConfig

    suite = SUITES[experiment.suite]
    for arm in experiment.arms:
        variant = arm_variant(experiment, arm, {})
        config = load_config(suite.train_config, TrainConfig, variant.train)
        scored = [load_config(path, EvalConfig).cache for path in suite.eval_configs]
        read = {*config.read_caches(), *scored, *(split_yaml(test, "val") for test in scored)}
        encode = encode_overrides(variant, build=False)
        for test in scored:  # (a data set a variant builds writes both splits: its paths differ, as they should)
            own, val = variant.encode.get(test), variant.encode.get(split_yaml(test, "val"))
            if own != val:
                raise ConfigError(f"{experiment.name}, arm {arm.name}: overrides {test} and {split_yaml(test, 'val')} "
                                  f"differently ({own} and {val})")
        if set(encode) - read:
            raise ConfigError(f"{experiment.name}, arm {arm.name}: overrides {sorted(set(encode) - read)}, which "
                              f"this suite does not read ({sorted(read)})")
        for yaml in read:
            load_config(yaml, EncodeConfig, encode.get(yaml))
        for name, keywords in variant.data.items():
            inspect.signature(quality.data_builder(name)).bind(Path("folder"), **keywords)


def run(experiment: Experiment, seeds: list[int], arms: list[Arm], extra: dict, split: str) -> list[dict]:
    rows = []
    for arm in arms:
        variant = arm_variant(experiment, arm, extra)
        rows += [{"arm": arm.name, **row, "quoted": arm.quoted}
                 for row in SUITES[experiment.suite].run(seeds, None, variant, split=split)]
    return rows


SPLIT_READING = {  # how a table scored on each split reads
    "val": " (where arms are compared; the quality tables score the test split).",
    "test": " (the quality tables' split: a choice made here is biased upward on it).",
    "train": " (the questions the arms trained on: a diagnostic of fit, never a choice; each ceiling fit and "
             "scored on the same training rows).",
}


def report_lines(experiment: Experiment, rows: list[dict], arms: list[Arm], split: str) -> list[str]:
    lines = [f"{experiment.name}: {experiment.decides}. Shipped: {experiment.chose}. Scored on the {split} split"
             + SPLIT_READING[split], "",
             "| arm | task | metric | model (mean ± std) | per seed | ceiling | baseline | minutes per seed |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['task']} | {r['metric']} | {fmt(r.get('model'))} | "
              f"{' / '.join(f'{v:.3f}' for v in r.get('model', []))} | {fmt(r.get('ceiling'))} | "
              f"{fmt(r.get('baseline'))} | {np.mean(r.get('minutes', [np.nan])):.1f} |" for r in rows]
    lines += ["", "benchmarks/RESULTS.md quoted (" + "; ".join(f'"{line}"' for line in experiment.results) + "; on the "
              "test split unless it says otherwise; a ± quoted before 2026-12-06 is the population std, the "
              "table's the sample std):"]
    lines += [f"- {arm.name}: {arm.quoted}" for arm in arms]
    if experiment.differs:
        lines += ["", f"Differs from the original runs: {experiment.differs}."]
    return lines


def listing() -> str:
    return "\n".join(f"{e.name}: decides {e.decides}; chose {e.chose}; RESULTS.md: "
                     + "; ".join(f'"{line}"' for line in e.results) for e in EXPERIMENTS.values())


def main():
    from pipelines.config import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", choices=list(EXPERIMENTS), metavar="NAME",
                        help="an experiment: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--list", action="store_true", help="one line per experiment, and stop")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", choices=tuple(SPLIT_READING), default="val",
                        help="the split the arms are scored on: val (default: choosing there leaves the test split's "
                             "figures unbiased), test (as the experiments quoted before 2026-12-06 were), or train (a "
                             "diagnostic: how closely each arm fits what it trained on)")
    parser.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms (default: all)")
    parser.add_argument("--out", type=Path, help="default: runs/experiments/NAME")
    parser.add_argument("--steps", type=int, help="every phase this many steps (a smoke run)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="over every arm's train config")
    parser.add_argument("--caches", type=Path,
                        help="the demo's cache entries, as `quality.py --write-caches` wrote them: no data or encoders")
    args = parser.parse_args()
    if args.list:
        return print(listing())
    if args.name is None:
        parser.error("name an experiment (--list lists them)")
    experiment = EXPERIMENTS[args.name]
    arms = [a for a in experiment.arms if not args.arms or a.name in args.arms]
    unknown = set(args.arms or []) - {a.name for a in experiment.arms}
    if unknown:
        parser.error(f"{experiment.name} has no arm {sorted(unknown)}; its arms: {[a.name for a in experiment.arms]}")
    out = (args.out or ROOT / "runs" / "experiments" / experiment.name).absolute()
    extra = {**({f"phase{p}.{key}": value for p in (1, 2) for key, value in
                 (("steps", args.steps), ("warmup_steps", 0))} if args.steps else {}),
             **parse_overrides(args.set), "output_dir": str(out / "train")}
    if args.caches:
        quality.CACHES.update(json.loads(args.caches.read_text()))
    quality.SINGLE_PROCESS = quality.UNTRACKED = True  # the training core and evaluation in this process, no MLflow

    os.chdir(ROOT)  # the shipped configs use paths relative to the repository
    if not args.caches:
        from pipelines.demo import prepare_assets

        prepare_assets()  # the demo's data, encoders and stand-in backbone, each made when missing
    elif "model.backbone.path" not in extra:  # the stand-in, trained here when missing, as quality.py does
        import torch

        from pipelines.demo_backbone import pretrained_backbone

        pretrained_backbone(Path("runs/demo/backbone"), device="cuda" if torch.cuda.is_available() else "cpu")
    rows = run(experiment, args.seeds, arms, extra, args.split)
    machine = f"{quality.machine_description()}; seeds {args.seeds}; the {args.split} split; trained in one process"
    if args.steps:
        machine += f"; {args.steps} steps a phase (a smoke run)"
    if args.set:  # every arm's figures depend on them: the report names them, as the command did
        machine += f"; every arm with --set {' '.join(args.set)}"
    write_report(out, experiment.name, machine, rows, report_lines(experiment, rows, arms, args.split))


if __name__ == "__main__":
    main()
