"""The frozen-subspace metric aggregated over a model, and the options of a monitor that logs it (no Lightning).

For a parameter refreshed from basis B_old to B_new (both (d, r), orthonormal columns) the overlap is
``||B_old^T B_new||_F^2 / r`` in [0, 1] (1: the subspace did not move; ``RefreshRecord.overlap``). Two independent
random r-dimensional subspaces of R^d overlap r/d on average (the chance level, ``RefreshRecord.chance``), so the
normalised overlap ``(overlap - r/d) / (1 - r/d)`` reads 0 at chance and 1 when frozen (full-rank weights, r = d, have
no normalised value).

:func:`overlap_metrics` turns ``parameter name -> (latest overlap, chance)`` into the scalars that
``lowrank_recipes.callbacks.SubspaceOverlapMonitor`` logs, by module type (:func:`lowrank.names.module_types`: unique
labels, e.g. ``attn.c_proj`` and ``mlp.c_proj`` where two modules share the leaf ``c_proj``); a plain training loop can
do the same from a refresh listener::

    latest, names = {}, lowrank_param_names(optimizer.param_groups)
    optimizer.register_refresh_listener(
        lambda opt, records: latest.update({r.name: (r.overlap, r.chance) for r in records if r.overlap is not None}))
    ...
    print(overlap_metrics(latest, names))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from statistics import fmean

from lowrank.checks import check, dotted, is_int, is_number
from lowrank.names import layer_label, lowrank_param_names, module_type, module_types

__all__ = [
    "OverlapMonitorOptions",
    "chance_by_type",
    "layer_label",
    "lowrank_param_names",
    "module_type",
    "normalized_overlap",
    "overlap_metrics",
]


@dataclasses.dataclass
class OverlapMonitorOptions:
    """Options of the overlap monitor (``lowrank_recipes.callbacks.SubspaceOverlapMonitor``; the recipe's ``monitor``
    section).

    Attributes:
        per_layer: also log the overlap of every weight (``lowrank/overlap_layer/<parameter name>``).
        image_interval: refreshes (with at least one overlap) between two overlap pictures; None: no picture.
        frozen_threshold: normalised overlap in (0, 1] above which a refresh counts as "frozen".
        frozen_patience: consecutive frozen refreshes before the (single) warning.
    """

    per_layer: bool = False
    image_interval: int | None = 10
    frozen_threshold: float = 0.9
    frozen_patience: int = 3

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid value, each named ``prefix.<field>``."""
        threshold = self.frozen_threshold
        return [
            *check(isinstance(self.per_layer, bool), dotted(prefix, "per_layer"), self.per_layer, "true | false"),
            *check(
                self.image_interval is None or is_int(self.image_interval, 1),
                dotted(prefix, "image_interval"),
                self.image_interval,
                "an integer >= 1 or None",
            ),
            *check(
                is_number(threshold) and 0.0 < threshold <= 1.0,
                dotted(prefix, "frozen_threshold"),
                threshold,
                "a number in (0, 1]",
            ),
            *check(
                is_int(self.frozen_patience, 1),
                dotted(prefix, "frozen_patience"),
                self.frozen_patience,
                "an integer >= 1",
            ),
        ]


def normalized_overlap(overlap: float, chance: float) -> float | None:
    """(overlap - r/d) / (1 - r/d): 0 at chance, 1 when frozen; None for a full-rank weight (r = d)."""
    return None if chance >= 1.0 else (overlap - chance) / (1.0 - chance)


def _by_type(latest: Mapping[str, tuple[float, float]], names: Iterable[str]) -> dict[str, list[tuple[float, float]]]:
    types = module_types({*latest, *names})
    by_type: dict[str, list[tuple[float, float]]] = {}
    for name, pair in latest.items():
        by_type.setdefault(types[name], []).append(pair)
    return by_type


def chance_by_type(latest: Mapping[str, tuple[float, float]], names: Iterable[str] = ()) -> dict[str, float]:
    """module type -> mean chance level r/d of its weights in ``latest`` (types as in :func:`overlap_metrics`)."""
    return {kind: fmean(c for _, c in pairs) for kind, pairs in _by_type(latest, names).items()}


def overlap_metrics(latest: Mapping[str, tuple[float, float]], names: Iterable[str] = ()) -> dict[str, float]:
    """The aggregate scalars (module docstring) of ``parameter name -> (overlap, chance)``; empty for no entry.

    Module types are :func:`lowrank.names.module_types` over the names of ``latest`` and ``names`` (pass every
    low-rank parameter name, ``lowrank.names.lowrank_param_names(optimizer.param_groups)``, so that a tag does not
    change when a weight with a colliding leaf name is first refreshed)."""
    by_type = _by_type(latest, names)
    if latest:
        by_type["mean"] = list(latest.values())
    metrics: dict[str, float] = {}
    for key, pairs in by_type.items():
        metrics[f"lowrank/overlap/{key}"] = fmean(o for o, _ in pairs)
        metrics[f"lowrank/overlap_chance/{key}"] = fmean(c for _, c in pairs)
        normalized = [n for n in (normalized_overlap(o, c) for o, c in pairs) if n is not None]
        if normalized:
            metrics[f"lowrank/overlap_normalized/{key}"] = fmean(normalized)
    return metrics
