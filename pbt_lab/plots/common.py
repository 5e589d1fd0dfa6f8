"""What every figure shares: a headless backend, the optimizers' colours, saving."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: runs headless on clusters and in CI
import matplotlib.pyplot as plt

from pbt_lab.config import OPTIMIZER_NAMES

COLOURS = dict(zip(OPTIMIZER_NAMES, plt.get_cmap("tab10").colors))


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
