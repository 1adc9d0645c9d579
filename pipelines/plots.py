"""Figures written as PNG files for MLflow (loss curves, confusion matrices, forecasts)."""

from pathlib import Path


def figure(**kwargs):
    """A figure of its own, drawn to a file: not pyplot's, whose switch to the file-only backend (matplotlib.use)
    closed the figures open in the caller's session (a notebook that called run_train). matplotlib is imported
    here: plotting is its one use, and it is slow to import."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
