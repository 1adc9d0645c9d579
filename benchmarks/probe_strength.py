"""The VQA probe at each L2 strength, trained and scored on the same cached features as the ceiling beside every
VQA score (`pipelines/metrics/ceilings.py`): its accuracy on its own training questions and on the scored split's,
beside the ceiling (the strength 5-fold cross-validation picks) and the majority answer. It says how much of the
ceiling is the probe's regularisation: a model that answers every training question right, as the demo's does,
is compared here with the probe that does too.

    python benchmarks/probe_strength.py [--encode-yaml configs/demo/encode_digits_{}.yaml] [--split val|test]
                                        [--out benchmarks/out]

The encode YAML names "{}" for the split; its entries are the caches `modrwkv demo` (or its encode configs) wrote,
read from the store (nothing is encoded when they are there). Prints the table, writes probe_strength.json and .md.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the project's packages, not this folder's modules
    sys.path[0] = str(ROOT)

from benchmarks.quality import machine_description, split_samples  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from pipelines.metrics.ceilings import (PROBE_MAX_ITER, PROBE_STRENGTHS, cross_validated_strength,  # noqa: E402
                                        majority_accuracy, probe_space, question_groups)

# the cross-validated grid, then weaker penalties towards none (the training questions are separable)
STRENGTHS = [*PROBE_STRENGTHS, 1e2, 1e4, 1e6]


def strength_rows(train: list, scored: list) -> tuple[list[dict], dict]:
    """One row per inverse strength C: the probe's accuracy on the training questions and on the scored ones, fit
    and scored on the rows the ceiling reads (one question group, as `vqa_ceilings` builds it); and the strength
    cross-validation picks (the ceiling's) and the majority answer's accuracy."""
    from sklearn.linear_model import LogisticRegression

    ((xtr, ytr, images, xte, yte),) = question_groups(train, scored).values()
    if len(set(ytr)) < 2:
        raise ValueError(f"every training question has the answer {ytr[0]!r}: no probe to fit")
    fit_rows, scored_rows = probe_space(xtr, xte)
    rows = []
    for c in STRENGTHS:
        probe = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER).fit(fit_rows, ytr)
        rows.append({"C": float(c), "train": float(np.mean(probe.predict(fit_rows) == np.array(ytr))),
                     "scored": float(np.mean(probe.predict(scored_rows) == np.array(yte)))})
    return rows, {"cross_validated_C": cross_validated_strength(fit_rows, ytr, images),
                  "majority": majority_accuracy(ytr, yte), "train_questions": len(ytr), "scored_questions": len(yte)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encode-yaml", default="configs/demo/encode_digits_{}.yaml",
                        help='an image VQA encode YAML with "{}" for the split (train, val, test)')
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    if "{}" not in args.encode_yaml:
        parser.error(f'--encode-yaml {args.encode_yaml}: name the split as "{{}}"')
    out = args.out.absolute()
    os.chdir(ROOT)  # the shipped encode configs use paths relative to the repository
    rows, summary = strength_rows(*split_samples(args.encode_yaml, {}, args.split))
    ceiling = next(r["scored"] for r in rows if r["C"] == summary["cross_validated_C"])
    lines = [f"{args.encode_yaml.format('*')}: a logistic-regression probe per inverse L2 strength C, "
             f"{summary['train_questions']} training questions, {summary['scored_questions']} {args.split} ones. "
             f"The ceiling: C {summary['cross_validated_C']:g} (5-fold cross-validation), {ceiling:.3f}; the "
             f"majority answer {summary['majority']:.3f}.", "",
             f"| C | train accuracy | {args.split} accuracy |", "|---|---|---|"]
    lines += [f"| {r['C']:g} | {r['train']:.3f} | {r['scored']:.3f} |" for r in rows]
    write_report(out, "probe_strength", f"{machine_description()}; the {args.split} split",
                 [{**summary, "ceiling": ceiling, "split": args.split, "encode_yaml": args.encode_yaml,
                   "strengths": rows}], lines)


if __name__ == "__main__":
    main()
