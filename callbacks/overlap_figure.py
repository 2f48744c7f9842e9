"""The overlap picture of :class:`lowrank_recipes.callbacks.SubspaceOverlapMonitor`, rendered off-screen with
matplotlib's Agg canvas.

Left: a heatmap of the latest overlap of every low-rank parameter, rows = layers, columns = module types (with
staggering each cell holds the parameter's own latest refresh). Right: the mean overlap of each module type against
the refresh step, with the chance level r/d dashed. matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(text))


def render_overlap_figure(
    cells: dict[tuple[str, str], float],
    history: Sequence[tuple[int, dict[str, float]]],
    chance: float | None,
    step: int,
) -> np.ndarray:
    """Draws the picture and returns it as an (H, W, 3) uint8 array.

    Args:
        cells: (layer, module type) -> latest overlap in [0, 1]. Column order is the order of first appearance.
        history: (refresh step, module type -> mean overlap at that refresh), oldest first.
        chance: the mean chance level r/d to draw as a reference line, if known.
        step: the global step the picture belongs to (in the title).

    Raises:
        ImportError: when matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = sorted({layer for layer, _ in cells}, key=natural_key)
    types = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(layers), len(types)), np.nan)
    for (layer, kind), value in cells.items():
        grid[layers.index(layer), types.index(kind)] = value

    height = min(12.0, 2.5 + 0.3 * len(layers))
    figure = Figure(figsize=(11.0, height), dpi=80)
    canvas = FigureCanvasAgg(figure)
    heat, lines = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.3]})

    image = heat.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    heat.set_xticks(range(len(types)), types, rotation=45, ha="right")
    heat.set_yticks(range(len(layers)), layers)
    heat.set_title(f"latest overlap per weight (step {step})")
    if grid.size <= 160:  # small enough to print the numbers in the cells
        for (row, col), value in np.ndenumerate(grid):
            if not math.isnan(value):
                heat.text(
                    col,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value > 0.6 else "white",
                )
    figure.colorbar(image, ax=heat, fraction=0.05)

    for kind in types:
        points = [(s, values[kind]) for s, values in history if kind in values]
        if points:
            xs, ys = zip(*points)
            lines.plot(xs, ys, marker="o", markersize=3, label=kind)
    if chance is not None:
        lines.axhline(chance, color="gray", linestyle="--", label=f"chance r/d = {chance:.3f}")
    lines.set_ylim(0.0, 1.02)
    lines.set_xlabel("refresh step")
    lines.set_ylabel("overlap ||B_old^T B_new||_F^2 / r")
    lines.set_title("mean overlap by module type")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=7, loc="lower right")

    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
