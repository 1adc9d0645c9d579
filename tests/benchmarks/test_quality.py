"""benchmarks/quality.py's table cells (experiments.py prints the same)."""

from benchmarks.quality import fmt


def test_a_cell_shows_mean_and_std_over_seeds_and_no_spread_for_one_seed():
    assert fmt([0.78, 0.77, 0.77]) == "0.773 ± 0.005"  # numpy.std, as every ± in benchmarks/RESULTS.md
    assert fmt([0.78]) == "0.780 (one seed)"  # not "0.780 ± 0.000": one seed measures no spread
    assert fmt([]) == fmt(None) == "—" and fmt(0.245) == "0.245"
