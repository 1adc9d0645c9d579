"""benchmarks/wkv7_kernels.py: the share of the memory floor reads the card it runs on; decode steps are timed."""

from benchmarks.wkv7_kernels import peak_bandwidth


def test_the_memory_floor_uses_the_cards_own_bandwidth():
    """The rehearsal passed the H200's 4800 GB/s whatever the card: on an H100 (3350) the share read 1.43x low."""
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth("NVIDIA H200") == 4800.0
    assert peak_bandwidth("NVIDIA A100-SXM4-80GB") is None  # unknown: no floor column rather than a wrong one


def test_decode_rows_time_one_step_per_backend_and_batch_size():
    from benchmarks.wkv7_kernels import decode_steps

    rows = decode_steps("cpu", ("reference", "chunked"), H=2, N=8)
    assert [(r["B"], r["backend"]) for r in rows] == [(1, "reference"), (1, "chunked"), (64, "reference"),
                                                      (64, "chunked")]
    assert all(r["steps_per_s"] > 0 and r["device"] == "cpu" for r in rows)
