"""Forecast errors: MSE / MAE on the normalised scale the model predicts in, on the original scale and on each
series' training-range scale (the benchmarks' "standardized" figures), and MASE, which divides the error by that of
a seasonal-naive forecast on the lookback window.

Arrays are [windows, horizon] (or [horizon] for one window); lookback windows are [windows, length].
"""

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


def forecast_errors(prediction, target, mean, std) -> dict[str, float]:
    """MSE and MAE of normalised forecasts, and of the same forecasts back on the original scale."""
    original_prediction, original_target = denormalize(prediction, mean, std), denormalize(target, mean, std)
    return {"mse_normalized": mse(prediction, target), "mae_normalized": mae(prediction, target),
            "mse": mse(original_prediction, original_target), "mae": mae(original_prediction, original_target)}


def standardized_errors(prediction, target, mean, std, train_std) -> dict[str, float]:
    """MSE and MAE on each series' training-range scale (original-scale errors / its train std): the scale the
    Time-Series-Library's tables report, comparable across series and datasets. Windows whose series was constant
    in training (std 0) have none: left out, and counted; {} when no window has one."""
    train_std = np.asarray(train_std, dtype=np.float64).reshape(-1)
    scaled = train_std > 0
    if not scaled.any():
        return {}
    # the original-scale error is the normalised one times its window's std (the mean cancels)
    normalized = np.asarray(prediction, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    errors = (normalized * np.asarray(std, dtype=np.float64).reshape(-1, 1))[scaled] / train_std[scaled, None]
    left_out = int(np.sum(~scaled))
    return {"mse_standardized": float(np.mean(errors**2)), "mae_standardized": float(np.mean(np.abs(errors))),
            **({"windows_without_train_scale": left_out} if left_out else {})}


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


def mase(prediction, target, lookback, period: int = 1) -> float:
    """Mean over windows of MAE / `mase_scale` (M4's per-window MASE). A window whose scale is 0 has no MASE and is
    left out of the mean (count them with `mase_scale`); NaN when no window has one."""
    prediction, target = matching_arrays(prediction, target)
    prediction, target = np.atleast_2d(prediction), np.atleast_2d(target)
    scale = mase_scale(lookback, period)
    if scale.shape[0] != prediction.shape[0]:
        raise ValueError(f"need one lookback window per forecast: got {scale.shape[0]} for {prediction.shape[0]}")
    scaled = scale > 0
    if not scaled.any():
        return float("nan")
    return float(np.mean(np.mean(np.abs(prediction - target), axis=1)[scaled] / scale[scaled]))
