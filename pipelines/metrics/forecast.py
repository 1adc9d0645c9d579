"""Forecast errors: MSE / MAE on the normalised scale the model predicts in, on the original scale and on each
series' training-range scale (the benchmarks' "standardized" figures), and MASE, which divides the error by that of
a seasonal-naive forecast on the lookback window.

Arrays are [windows, horizon] (or [horizon] for one window); lookback windows are [windows, length]. A test set's
errors are summed batch by batch (`ForecastErrors`): the paper's ECL and Traffic test sets hold millions of windows.
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


def mse(prediction, target) -> float:
    prediction, target = matching_arrays(prediction, target)
    return float(np.mean((prediction - target) ** 2))


def mae(prediction, target) -> float:
    prediction, target = matching_arrays(prediction, target)
    return float(np.mean(np.abs(prediction - target)))


def matching_arrays(prediction, target) -> tuple[np.ndarray, np.ndarray]:
    prediction, target = np.asarray(prediction, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    if prediction.size == 0:
        raise ValueError("no values to score")
    return prediction, target


def denormalize(values, mean, std) -> np.ndarray:
    """Undoes per-window z-scoring: values [windows, horizon] * std[windows] + mean[windows]."""
    values = np.asarray(values, dtype=np.float64)
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if values.ndim == 2:  # one mean/std per window (row), broadcast along the horizon
        mean, std = mean.reshape(-1, 1), std.reshape(-1, 1)
    return values * std + mean


@dataclass
class ForecastErrors:
    """A forecast's errors over a test set, added a batch of windows at a time: `result()` is what one call on all
    the windows would give, in the memory of a few sums.

    - mse/mae_normalized: on the per-window z-scored values the model predicts;
    - mse/mae: on the original scale, the normalised error times its window's std (the mean cancels);
    - mse/mae_standardized: the original error over its series' training std, the scale the Time-Series-Library's
      tables report; a series constant in training (std 0) has none: left out and counted; none at all when a
      batch came without training scales (a cache from before the reader recorded them);
    - mase: the mean over windows of MAE over the seasonal-naive in-sample MAE of that window's lookback (scale-
      free, so the normalised values serve). M4 and GIFT-Eval scale by the whole series' history before the
      forecast instead, so these figures are not theirs: a lookback-scaled MASE, noisier for short lookbacks. A
      window repeating exactly with `period` has no scale: left out and counted, NaN when no window has one. Needs
      each window's lookback."""

    period: int = 1
    sums: Counter = field(default_factory=Counter)  # metric -> sum of its terms
    terms: Counter = field(default_factory=Counter)  # metric -> how many terms (values, or windows for mase)
    left_out: Counter = field(default_factory=Counter)  # "windows_without_train_scale" / "windows_without_mase"
    without_train_scales: bool = False

    def add(self, prediction, target, std, lookback=None, train_std=None) -> "ForecastErrors":
        prediction, target = matching_arrays(prediction, target)
        normalized = np.atleast_2d(prediction - target)
        original = normalized * np.asarray(std, dtype=np.float64).reshape(-1, 1)
        self.sum_errors("_normalized", normalized)
        self.sum_errors("", original)
        if train_std is None:
            self.without_train_scales = True
        else:
            train_std = np.asarray(train_std, dtype=np.float64).reshape(-1)
            scaled = train_std > 0
            self.sum_errors("_standardized", original[scaled] / train_std[scaled, None])
            self.left_out["windows_without_train_scale"] += int(np.sum(~scaled))
        if lookback is not None:
            scale = mase_scale(lookback, self.period)
            if scale.shape[0] != normalized.shape[0]:
                raise ValueError(f"need one lookback window per forecast: got {scale.shape[0]} for "
                                 f"{normalized.shape[0]}")
            scaled = scale > 0
            self.sums["mase"] += float(np.sum(np.mean(np.abs(normalized), axis=1)[scaled] / scale[scaled]))
            self.terms["mase"] += int(np.sum(scaled))
            self.left_out["windows_without_mase"] += int(np.sum(~scaled))
        return self

    def sum_errors(self, scale: str, errors: np.ndarray) -> None:
        self.sums[f"mse{scale}"] += float(np.sum(errors**2))
        self.sums[f"mae{scale}"] += float(np.sum(np.abs(errors)))
        self.terms[f"mse{scale}"] += errors.size
        self.terms[f"mae{scale}"] += errors.size

    def result(self) -> dict[str, float]:
        """The means, and how many windows each left out (where some were)."""
        if not self.terms["mse"]:
            raise ValueError("no values to score")
        means = {k: self.sums[k] / n if n else float("nan") for k, n in self.terms.items()
                 if not (k.endswith("_standardized") and (self.without_train_scales or not n))}
        left_out = {k: n for k, n in self.left_out.items()
                    if n and not (k == "windows_without_train_scale" and self.without_train_scales)}
        return {**means, **left_out}


def seasonal_naive(lookback, horizon: int, period: int = 1) -> np.ndarray:
    """Repeats the last `period` values of each lookback window (period 1: the last value, the naive forecast)."""
    lookback = np.asarray(lookback, dtype=np.float64)
    if not 0 < period <= lookback.shape[-1]:
        raise ValueError(f"the period must be in [1, {lookback.shape[-1]}] (the lookback length), got {period}")
    last_season = lookback[..., -period:]
    return last_season[..., np.arange(horizon) % period]


def mase_scale(lookback, period: int = 1) -> np.ndarray:
    """Each lookback window's in-sample MAE of the seasonal-naive one-step forecast, mean |y_t - y_{t-period}|:
    MASE's denominator; 0 for a window that repeats exactly with that period (a flat one for period 1)."""
    lookback = np.atleast_2d(np.asarray(lookback, np.float64))
    if lookback.shape[1] <= period:
        raise ValueError(f"the lookback ({lookback.shape[1]} steps) must be longer than the period {period}")
    return np.mean(np.abs(lookback[:, period:] - lookback[:, :-period]), axis=1)
