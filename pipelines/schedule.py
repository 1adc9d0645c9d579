"""The learning-rate schedule both phases use: linear warmup, then cosine decay to `min_ratio` of the peak."""

import math


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`: the warmup reaches the peak at its
    last step, the decay `min_ratio` at the run's last (step total - 1)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step + 1 - warmup) / (total - warmup), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_of(hp) -> dict:
    """What fixes a phase's lr at every step (`PhaseConfig`'s): a checkpoint records it, a resume compares it."""
    return {"lr": hp.lr, "steps": hp.steps, "warmup_steps": hp.warmup_steps, "min_lr_ratio": hp.min_lr_ratio}


def lr_at(schedule: dict, step: int) -> float:
    """The lr of optimizer step `step` (0-based) under `schedule_of`'s record."""
    return schedule["lr"] * warmup_cosine(step, schedule["steps"], schedule["warmup_steps"], schedule["min_lr_ratio"])
