"""benchmarks/probe_strength.py on synthetic cached samples: a probe per strength, read as the ceiling reads them;
its command on the demo's caches is run by hand (they are made by `modrwkv demo`)."""

import numpy as np

from benchmarks.probe_strength import STRENGTHS, strength_rows
from pipelines.metrics.ceilings import PROBE_STRENGTHS, vqa_ceilings
from tests.pipelines.test_ceilings import vqa_sample


def test_every_strength_fits_and_scores_the_questions_the_ceiling_reads():
    rng = np.random.default_rng(0)

    def make(n):  # more features (6 tokens of 30) than training rows: every strength fits them all
        samples = []
        for i in range(n):
            tokens = rng.standard_normal((6, 30))
            tokens[1:, i % 3] += 0.6  # the class, weakly, in every patch token
            samples.append(vqa_sample(tokens, "Which?", f"c{i % 3}", "all"))
        return samples

    train, scored = make(60), make(90)
    rows, summary = strength_rows(train, scored)

    assert [r["C"] for r in rows] == STRENGTHS
    assert all(r["train"] == 1.0 for r in rows)
    assert all(0 <= r["scored"] <= 1 for r in rows) and len({r["scored"] for r in rows}) > 1
    # the row at the strength cross-validation picks is the ceiling beside every score: the same rows, the same fit
    assert summary["cross_validated_C"] in PROBE_STRENGTHS
    (at_chosen,) = [r for r in rows if r["C"] == summary["cross_validated_C"]]
    assert at_chosen["scored"] == vqa_ceilings(train, scored)["all"]["ceiling"]
    assert summary["majority"] == vqa_ceilings(train, scored)["all"]["baseline"]
    assert (summary["train_questions"], summary["scored_questions"]) == (60, 90)
