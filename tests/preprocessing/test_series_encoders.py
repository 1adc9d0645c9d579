"""Series encoders: Timer built from a tiny config, Fracast-0 from the `fracast` wheel (its real weights,
checked against the package's own forward) and from a random tiny model for the wrapper's behaviour."""

import numpy as np
import pytest
import torch

from preprocessing.encoders import build_encoder
from preprocessing.encoders.convert import export_encoder
from preprocessing.encoders.fracast import FracastConfig, FracastNet, save_fracast, significant_periods
from preprocessing.encoders.timer import TimerConfig, TimerModel

PATCH = 8


def seasonal(length, seed=0, level=10.0):
    t = np.arange(length)
    noise = 0.3 * np.random.default_rng(seed).standard_normal(length)
    return (level + 3 * np.sin(2 * np.pi * t / 24) + np.sin(2 * np.pi * t / 7) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def timer(tmp_path_factory):
    path = tmp_path_factory.mktemp("timer")
    config = TimerConfig(input_token_len=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4)
    torch.manual_seed(0)
    TimerModel(config).save_pretrained(path)
    return build_encoder("timer", path)


@pytest.fixture(scope="module")
def tiny_fracast(tmp_path_factory):
    path = tmp_path_factory.mktemp("fracast")
    torch.manual_seed(0)
    model = FracastNet(FracastConfig(d_model=16, context=64, stages=4))
    for p in model.parameters():  # the real model is zero-initialised in places; make every path matter
        torch.nn.init.normal_(p, std=0.3)
    save_fracast(model, path)
    return build_encoder("fracast", path)


def test_timer_gives_one_feature_per_patch(timer):
    a, b = timer.encode([seasonal(40), seasonal(21, seed=1)], ["a", "b"])
    assert timer.output_dim == 32
    assert a.shape == (5, 32) and b.shape == (3, 32)  # 21 points -> left-padded to 3 patches
    assert torch.isfinite(a).all() and len(timer.weights_hash()) == 64
    (alone,) = timer.encode([seasonal(21, seed=1)])
    torch.testing.assert_close(alone, b, rtol=1e-5, atol=1e-5)  # batching with a longer series changes nothing


def test_timer_patch_features_do_not_see_later_patches(timer):
    series = seasonal(48)
    later_changed = series.copy()
    later_changed[3 * PATCH:] += np.random.default_rng(5).standard_normal(3 * PATCH).astype(np.float32)
    # at the model level: the wrapper's z-score spans the whole series, so later points move every input
    x = torch.from_numpy(series)[None]
    y = torch.from_numpy(later_changed)[None]
    with torch.no_grad():
        fx, fy = timer.model(x), timer.model(y)
    torch.testing.assert_close(fx[:, :3], fy[:, :3])
    assert not torch.allclose(fx[:, 3:], fy[:, 3:])


def test_timer_is_scale_and_shift_invariant(timer):
    (raw,) = timer.encode([seasonal(40)])
    (scaled,) = timer.encode([seasonal(40) * 1000 - 5])
    torch.testing.assert_close(raw, scaled, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["timer", "fracast"])
def test_series_encoders_refuse_nan_naming_the_sample(kind, timer, tiny_fracast):
    encoder = timer if kind == "timer" else tiny_fracast
    bad = seasonal(40)
    bad[7] = np.nan
    with pytest.raises(ValueError, match="sample s-7: the series has NaN"):
        encoder.encode([seasonal(40), bad], ["ok", "s-7"])
    with pytest.raises(ValueError, match="sample m: expected a univariate series"):
        encoder.encode([np.zeros((40, 2), np.float32)], ["m"])


def test_fracast_wrapper_lengths_and_limits(tiny_fracast):
    a, b = tiny_fracast.encode([seasonal(64), seasonal(10, seed=2)])
    assert a.shape == (64, 16) and b.shape == (10, 16) and tiny_fracast.output_dim == 16
    with pytest.raises(ValueError, match="sample long: 65 points; Fracast takes 8 to 64"):
        tiny_fracast.encode([seasonal(65)], ["long"])
    with pytest.raises(ValueError, match="sample short: 5 points"):
        tiny_fracast.encode([seasonal(5)], ["short"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fracast_runs_in_half_precision_and_off_the_cpu(tiny_fracast, dtype):
    """Its periodogram ran torch's FFT in the model's dtype (the CPU's takes no fp16/bf16) and its phase and scale
    features were made on the CPU in fp32 whatever the model's device and dtype: an encode on a GPU failed."""
    model_dir = tiny_fracast.model_dir
    half = build_encoder("fracast", model_dir, dtype=dtype)
    series = [seasonal(64), seasonal(40, seed=3)]
    assert next(half.model.parameters()).dtype == dtype
    for low, full in zip(half.encode(series), tiny_fracast.encode(series)):
        assert low.shape == full.shape and torch.allclose(low, full, rtol=0.1, atol=0.1)
    model = FracastNet(FracastConfig(d_model=16, context=64, stages=4)).to("meta")  # a device of its own
    out = model(torch.zeros(2, 64, device="meta"), torch.ones(2, 64, dtype=torch.bool, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 64, 16)


def test_periodogram_finds_the_seasons():
    periods = significant_periods(torch.from_numpy(seasonal(2048))[None], top_k=4, min_period=2, alpha=0.05)
    assert {24, 7} <= set(periods[0].tolist())


@pytest.mark.slow
def test_fracast_matches_the_package_forward(tmp_path):
    from fracast import FracastModel  # the reference implementation (weights extra)

    encoder = build_encoder("fracast", export_encoder("fracast", tmp_path))
    assert encoder.output_dim == 64
    reference = FracastModel.from_pretrained(weights="fp32")
    captured = {}
    reference.core.register_forward_hook(lambda module, args, out: captured.update(hidden=out))
    series = seasonal(500) * 40 + 900  # the package min-max scales; our wrapper z-scores first: same input
    reference.forecast(series)
    (ours,) = encoder.encode([series], ["s"])
    ref = captured["hidden"][0, -500:]
    assert ours.shape == ref.shape == (500, 64)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4  # measured ~6e-7
