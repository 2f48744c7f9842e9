"""The report of ``lowrank-diagnose delta``: how far each module moved between two checkpoints A and B.

From :func:`lowrank.module_delta.module_deltas` (B against the reference A, every weight of the model):

* per (layer, module type): ||W_B - W_A||_F and the relative change ||W_B - W_A||_F / ||W_A||_F of the type's
  weights in that layer (:func:`lowrank.module_delta.by_layer_and_module_type`; the embedding, final norm and head
  form the layer ``model``);
* per module type: its share of the total squared change sum ||dW||^2 (the shares add up to 1), its relative change,
  and Sarle's bimodality coefficient of the element-wise relative change r = (w_B - w_A) / w_A (> 5/9 suggests two
  modes; elements with |w_A| below the threshold are excluded from r and counted).

:func:`write_report` writes ``delta.md`` (both tables), ``delta.json`` (the same numbers, non-finite ones as null, and
each type's histogram of clip(r, -1, 1)) and ``delta.png``: the heatmap of the relative change, decoder layers x module
types, drawn by the training-time picture's renderer
(:func:`lowrank_recipes.callbacks.module_delta_figure.render_delta_heatmap`: its colour scale spans the finite values,
and a non-finite cell, such as the inf of a weight whose reference norm is 0, is marked, never hidden). Every file is
rendered in memory before the first is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lowrank.module_delta import (
    DeltaOptions,
    ParameterDelta,
    bin_edges,
    by_layer_and_module_type,
    by_module_type,
    module_deltas,
)
from lowrank.names import layer_index

if TYPE_CHECKING:
    import numpy as np

REPORT_FILES: tuple[str, ...] = ("delta.md", "delta.json", "delta.png")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else ("nan" if math.isnan(value) else "inf")


class DeltaReport:
    """The deltas of B against A and their summaries (module docstring)."""

    def __init__(
        self,
        a: Mapping[str, Tensor],
        b: Mapping[str, Tensor],
        options: DeltaOptions = DeltaOptions(),
        sources: Mapping[str, str] | None = None,
    ) -> None:
        names = [key for key, value in a.items() if value.is_floating_point()]
        self.options = options
        self.sources = dict(sources or {})
        self.deltas: list[ParameterDelta] = module_deltas(b, a, options, names)
        self.cells = by_layer_and_module_type(self.deltas)  # (layer label, type) -> combined delta
        self.types = by_module_type(self.deltas)
        blocks = {d.layer: layer_index(d.name) for d in self.deltas if layer_index(d.name) is not None}
        self.layers = sorted(blocks, key=blocks.__getitem__)  # decoder layer labels in block order
        self.block_types = list(dict.fromkeys(d.module_type for d in self.deltas if layer_index(d.name) is not None))

    def matrix(self) -> list[list[float]]:
        """Relative change per decoder layer (rows, in order) and block module type (columns); nan where absent."""
        return [
            [
                self.cells[(layer, kind)].relative_l2 if (layer, kind) in self.cells else math.nan
                for kind in self.block_types
            ]
            for layer in self.layers
        ]

    # ------------------------------------------------------------------------------------------------------ text
    def type_table(self) -> str:
        rows = ["| module type | tensors | share of squared change | relative change | bimodality | excluded |"]
        rows.append("|---|---:|---:|---:|---:|---:|")
        for kind, t in self.types.items():
            rows.append(
                f"| {kind} | {t.parameters} | {t.share:.4f} | {_fmt(t.relative_l2)} | {_fmt(t.bimodality, 3)} | "
                f"{t.excluded_fraction:.2%} |"
            )
        return "\n".join(rows)

    def layer_table(self) -> str:
        rows = ["| layer | " + " | ".join(self.block_types) + " |", "|---|" + "---:|" * len(self.block_types)]
        for layer, values in zip(self.layers, self.matrix()):
            rows.append(f"| {layer} | " + " | ".join(_fmt(v) for v in values) + " |")
        outside = [(key, d) for key, d in self.cells.items() if key[0] not in self.layers]
        if outside:
            rows.append("")
            rows.append("| outside the blocks | relative change | l2 |")
            rows.append("|---|---:|---:|")
            rows += [f"| {kind} | {_fmt(d.relative_l2)} | {_fmt(d.l2)} |" for (_, kind), d in outside]
        return "\n".join(rows)

    def markdown(self) -> str:
        source = "".join(f"* {key}: `{value}`\n" for key, value in self.sources.items())
        return (
            "# Module delta\n\n"
            f"{source}\n"
            "Relative change ||W_B - W_A||_F / ||W_A||_F. Share: the type's part of the total squared change "
            "(sum of ||W_B - W_A||_F^2; the shares add up to 1). Bimodality: Sarle's coefficient of the element-wise "
            "relative change r = (w_B - w_A) / w_A over the elements with |w_A| >= "
            f"{self.options.threshold:g} (> 5/9 suggests two modes); excluded: the elements below that threshold.\n\n"
            "## Per module type\n\n"
            f"{self.type_table()}\n\n"
            "## Per layer and module type (relative change)\n\n"
            f"{self.layer_table()}\n"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            **self.sources,
            "threshold": self.options.threshold,
            "bins": self.options.bins,
            "bin_edges": bin_edges(self.options.bins).tolist(),
            "module_types": {
                kind: {
                    "tensors": t.parameters,
                    "share": t.share,
                    "l2": t.l2,
                    "ref_l2": t.ref_l2,
                    "relative_l2": _finite(t.relative_l2),
                    "bimodality": _finite(t.bimodality),
                    "included": t.included,
                    "excluded": t.excluded,
                    "histogram": t.histogram.tolist(),
                }
                for kind, t in self.types.items()
            },
            "cells": [
                {
                    "layer": layer,
                    "module_type": kind,
                    "l2": d.l2,
                    "ref_l2": d.ref_l2,
                    "relative_l2": _finite(d.relative_l2),
                }
                for (layer, kind), d in self.cells.items()
            ],
        }

    def heatmap_cells(self) -> dict[tuple[str, str], float]:
        """(decoder layer, module type) -> relative change: the cells of the heatmap (every cell when the weights have
        no decoder block)."""
        inside = {key: d.relative_l2 for key, d in self.cells.items() if key[0] in self.layers}
        return inside or {key: d.relative_l2 for key, d in self.cells.items()}


def render_heatmap(report: DeltaReport, step: int = 0) -> np.ndarray:
    """The heatmap of ``report`` as an (H, W, 3) uint8 image, titled with ``step`` (B's optimizer step).

    Raises:
        ImportError: when matplotlib is not installed.
    """
    from lowrank_recipes.callbacks.module_delta_figure import render_delta_heatmap  # matplotlib only when drawn

    return render_delta_heatmap(report.heatmap_cells(), step)


def write_report(report: DeltaReport, out: Path, files: Sequence[str] = REPORT_FILES, step: int = 0) -> list[Path]:
    """Writes the report's ``files`` into ``out`` (created); returns their paths. Everything is rendered first, so a
    failure (no matplotlib for delta.png) leaves nothing written. ``step`` titles the heatmap (B's optimizer step).

    Raises:
        ImportError: delta.png asked for and matplotlib not installed (nothing written).
    """
    texts: dict[str, str] = {}
    if "delta.md" in files:
        texts["delta.md"] = report.markdown()
    if "delta.json" in files:
        texts["delta.json"] = json.dumps(report.as_json(), indent=2) + "\n"
    image = render_heatmap(report, step) if "delta.png" in files else None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        (out / name).write_text(text)
        written.append(out / name)
    if image is not None:
        from matplotlib.image import imsave  # present: the heatmap was just drawn with it

        imsave(out / "delta.png", image, format="png")
        written.append(out / "delta.png")
    return written
