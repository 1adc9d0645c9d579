"""Figures written as PNG files for MLflow (loss curves, confusion matrices, forecasts)."""

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only backend; imported here, as plotting is the only use and it is slow
    to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
