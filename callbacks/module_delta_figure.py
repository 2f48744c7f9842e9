"""The weight-change picture of :class:`lowrank_recipes.callbacks.ModuleDeltaMonitor`: a heatmap of the relative L2
change ``||W - W_ref||_F / ||W_ref||_F`` of every (layer, module type), rows = layers (natural order), columns = module
types (order of first appearance), one colour scale from 0 to the largest finite value; the numbers are printed in the
cells when there are few enough. Rendered off-screen with matplotlib's Agg canvas; matplotlib is imported only when a
picture is drawn.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank_recipes.callbacks.overlap_figure import natural_key


def render_delta_heatmap(cells: dict[tuple[str, str], float], step: int) -> np.ndarray:
    """The heatmap of ``cells`` ((layer, module type) -> relative L2 change) at global step ``step`` as an (H, W, 3)
    uint8 array.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = sorted({layer for layer, _ in cells}, key=natural_key)
    types = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(layers), len(types)), np.nan)  # (layers, types)
    for (layer, kind), value in cells.items():
        grid[layers.index(layer), types.index(kind)] = value
    finite = grid[np.isfinite(grid)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0

    figure = Figure(figsize=(2.0 + 0.9 * len(types), min(12.0, 2.0 + 0.3 * len(layers))), dpi=80)
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=top, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(types)), types, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), layers)
    axes.set_title(f"relative L2 change ||W - W_ref|| / ||W_ref|| (step {step})", fontsize=9)
    if grid.size <= 160:  # small enough to print the numbers in the cells
        for (row, col), value in np.ndenumerate(grid):
            if not math.isnan(value):
                colour = "black" if value > 0.6 * top else "white"
                axes.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.05)
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
