"""The weight-change picture of :class:`lowrank_recipes.callbacks.ModuleDeltaMonitor`: a heatmap of the relative L2
change ``||W - W_ref||_F / ||W_ref||_F`` of every (layer, module type), rows = layers (natural order), columns = module
types (order of first appearance), one colour scale from 0 to the largest finite value; the numbers are printed in the
cells when there are few enough. A non-finite value (NaN or inf: a NaN or inf weight, or a change of an all-zero
reference) is never hidden: its cell is drawn in red (``NON_FINITE_COLOUR``) and labelled ``nan`` / ``inf`` whatever the
grid's size; a (layer, module type) without weights stays blank. Rendered off-screen with matplotlib's Agg canvas;
matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank_recipes.callbacks.overlap_figure import natural_key

NON_FINITE_COLOUR = "red"


def render_delta_heatmap(cells: dict[tuple[str, str], float], step: int) -> np.ndarray:
    """The heatmap of ``cells`` ((layer, module type) -> relative L2 change) at global step ``step`` as an (H, W, 3)
    uint8 array; non-finite cells in ``NON_FINITE_COLOUR``, labelled (module docstring).

    Raises:
        ImportError: when matplotlib is not installed.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = sorted({layer for layer, _ in cells}, key=natural_key)
    types = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(layers), len(types)), np.nan)  # (layers, types)
    present = np.zeros(grid.shape, dtype=bool)  # (layers, types): the cells that have weights
    for (layer, kind), value in cells.items():
        grid[layers.index(layer), types.index(kind)] = value
        present[layers.index(layer), types.index(kind)] = True
    finite = grid[np.isfinite(grid)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    broken = present & ~np.isfinite(grid)  # (layers, types): NaN or inf values, drawn as "over" the scale
    # a finite stand-in above vmax (matplotlib leaves non-finite pixels blank); absent cells masked, blank
    shown = np.ma.masked_array(np.where(broken, 2.0 * top, grid), mask=~present)
    cmap = colormaps["viridis"].with_extremes(over=NON_FINITE_COLOUR)

    figure = Figure(figsize=(2.0 + 0.9 * len(types), min(12.0, 2.0 + 0.3 * len(layers))), dpi=80)
    axes = figure.subplots()
    image = axes.imshow(shown, vmin=0.0, vmax=top, cmap=cmap, aspect="auto")
    axes.set_xticks(range(len(types)), types, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), layers)
    axes.set_title(f"relative L2 change ||W - W_ref|| / ||W_ref|| (step {step})", fontsize=9)
    for (row, col), value in np.ndenumerate(grid):
        if broken[row, col]:  # always labelled: a broken weight must be seen
            axes.text(col, row, "nan" if math.isnan(value) else "inf", ha="center", va="center", fontsize=7)
        elif present[row, col] and grid.size <= 160:  # small enough to print the numbers in the cells
            colour = "black" if value > 0.6 * top else "white"
            axes.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.05)
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
