"""The overlap picture of :class:`lowrank_recipes.callbacks.SubspaceOverlapMonitor`, rendered off-screen with
matplotlib's Agg canvas.

Left: a heatmap of the latest overlap of every low-rank parameter, rows = layers, columns = module types (with
staggering each cell holds the parameter's own latest refresh); each column's label carries its chance level r/d.
Right: the mean overlap of each module type against the refresh step, with that type's own chance level r/d dashed in
its colour (one grey line when every type has the same): with grouped-query attention k/v projections have a smaller
d than q/o and a higher chance level (e.g. 0.5 against 0.25), so one line for all would mislead. matplotlib is
imported only when a picture is drawn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported only when a picture is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(text))


def render_overlap_figure(
    cells: dict[tuple[str, str], float],
    history: Sequence[tuple[int, dict[str, float]]],
    chances: Mapping[str, float],
    step: int,
) -> np.ndarray:
    """Draws the picture (:func:`overlap_figure`) and returns it as an (H, W, 3) uint8 array.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = overlap_figure(cells, history, chances, step)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def overlap_figure(
    cells: dict[tuple[str, str], float],
    history: Sequence[tuple[int, dict[str, float]]],
    chances: Mapping[str, float],
    step: int,
) -> Figure:
    """The picture as a matplotlib ``Figure`` (axes: heatmap, its colour bar, the curves).

    Args:
        cells: (layer, module type) -> latest overlap in [0, 1]. Column order is the order of first appearance.
        history: (refresh step, module type -> mean overlap at that refresh), oldest first.
        chances: module type -> its chance level r/d (the mean over its weights), drawn as that type's reference
            line; a type missing here has none, a full-rank type (r/d = 1) is not drawn.
        step: the global step the picture belongs to (in the title).

    Raises:
        ImportError: when matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    layers = sorted({layer for layer, _ in cells}, key=natural_key)
    types = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(layers), len(types)), np.nan)
    for (layer, kind), value in cells.items():
        grid[layers.index(layer), types.index(kind)] = value

    height = min(12.0, 2.5 + 0.3 * len(layers))
    figure = Figure(figsize=(11.0, height), dpi=80)
    heat, lines = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.3]})

    image = heat.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    labels = [f"{kind}\nr/d {chances[kind]:.2f}" if kind in chances else kind for kind in types]
    heat.set_xticks(range(len(types)), labels, rotation=45, ha="right")
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

    colours = {}
    for kind in types:
        points = [(s, values[kind]) for s, values in history if kind in values]
        if points:
            xs, ys = zip(*points)
            (curve,) = lines.plot(xs, ys, marker="o", markersize=3, label=kind)
            colours[kind] = curve.get_color()
    _chance_lines(lines, {kind: chances[kind] for kind in types if kind in chances}, colours)
    lines.set_ylim(0.0, 1.02)
    lines.set_xlabel("refresh step")
    lines.set_ylabel("overlap ||B_old^T B_new||_F^2 / r")
    lines.set_title("mean overlap by module type")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=7, loc="lower right")

    figure.tight_layout()
    return figure


def _chance_lines(axes: Axes, chances: dict[str, float], colours: dict[str, str]) -> None:
    """Dashed chance levels: one grey line when every type shares it, else one per type in the type's colour."""
    drawn = {kind: value for kind, value in chances.items() if value < 1.0}  # r = d: the overlap is always 1
    levels = {round(value, 9) for value in drawn.values()}
    if len(levels) == 1:
        (level,) = levels
        axes.axhline(level, color="gray", linestyle="--", label=f"chance r/d = {level:.3f}")
        return
    for kind, level in drawn.items():
        colour = colours.get(kind, "gray")
        axes.axhline(level, color=colour, linestyle="--", linewidth=1.0, label=f"chance {kind} = {level:.3f}")
