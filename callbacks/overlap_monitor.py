"""``SubspaceOverlapMonitor``: logs how far each refresh moved the subspaces (the frozen-subspace metric).

For a parameter refreshed from basis B_old to B_new (both (d, r), orthonormal columns) the overlap is
``||B_old^T B_new||_F^2 / r`` in [0, 1] (1: the subspace did not move; ``RefreshRecord.overlap``). Two independent
random r-dimensional subspaces of R^d overlap r/d on average (the chance level, ``RefreshRecord.chance``), so the
monitor logs beside it the chance level and the normalised overlap ``(overlap - r/d) / (1 - r/d)`` (0: chance,
1: frozen; full-rank weights, r = d, have no normalised value and are left out of it).

Where the records come from: the monitor subscribes in ``on_fit_start`` to the :class:`callbacks.SubspaceResampler`
attached to the same trainer and calls nothing itself; without a resampler it raises. With its defaults the
resampler refreshes on the optimizer's own schedule (every ``update_gap`` steps), so "no resampler" has no use case
that adding ``SubspaceResampler()`` does not cover.

Tags, logged at every refresh that has at least one overlap (the first refresh of a parameter has none), on rank
zero through every logger of the trainer with ``step=trainer.global_step`` (= the refresh step). The aggregates
average the *latest* overlap of every weight refreshed at least twice so far: without staggering that is exactly the
weights of this refresh; with staggering (one slice of layers per refresh) it keeps the curves model-wide instead of
zigzagging between slices.

* ``lowrank/overlap/<module_type>`` and ``lowrank/overlap/mean``: mean overlap of the weights of that module type
  (the second-to-last component of the parameter name: ``q_proj`` ... ``down_proj``, ``fc1`` for ``fc1.weight``),
  and of all of them;
* ``lowrank/overlap_chance/<module_type>``, ``lowrank/overlap_chance/mean``: the mean r/d of the same weights;
* ``lowrank/overlap_normalized/<module_type>``, ``lowrank/overlap_normalized/mean``: the mean normalised overlap;
* with ``per_layer=True``, ``lowrank/overlap_layer/<parameter name>`` for each weight refreshed at this step
  (wrapper prefixes such as ``_orig_mod.`` removed, as in :func:`lowrank.normalize_param_name`).

Every ``image_interval`` refreshes (and at the end of training) a picture (``lowrank/overlap_heatmap``, see
:mod:`callbacks.overlap_figure`) goes to every logger whose ``experiment`` has ``add_image`` (TensorBoard); other
loggers are skipped silently. When ``lowrank/overlap_normalized/mean`` is above ``frozen_threshold`` at
``frozen_patience`` consecutive refreshes it warns once that the subspace is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import fmean
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from callbacks.overlap_figure import render_overlap_figure
from callbacks.resampler import RefreshSubscriber
from lowrank import RefreshRecord, normalize_param_name

IMAGE_TAG = "lowrank/overlap_heatmap"
_MAX_HISTORY = 1000  # refreshes kept for the picture; beyond it every other one is dropped


def module_type(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``q_proj``; ``fc1.weight`` -> ``fc1``; ``w`` -> ``w``."""
    parts = normalize_param_name(name).split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def layer_label(name: str) -> str:
    """The layer a weight belongs to: the name up to its last numeric component before the module
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), else its parent path, else ``model``."""
    parts = normalize_param_name(name).split(".")[:-2]
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    if numeric:
        parts = parts[: numeric[-1] + 1]
    return ".".join(parts) or "model"


def normalized_overlap(overlap: float, chance: float) -> float | None:
    """(overlap - r/d) / (1 - r/d): 0 at chance, 1 when frozen; None for a full-rank weight (r = d)."""
    return None if chance >= 1.0 else (overlap - chance) / (1.0 - chance)


def overlap_metrics(latest: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """The aggregate scalars (module docstring) of ``parameter name -> (overlap, chance)``; empty for no entry."""
    by_type: dict[str, list[tuple[float, float]]] = {}
    for name, pair in latest.items():
        by_type.setdefault(module_type(name), []).append(pair)
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


class SubspaceOverlapMonitor(RefreshSubscriber):
    """Logs the subspace overlap of every refresh made by the trainer's :class:`SubspaceResampler` (module docstring).

    Args:
        per_layer: also log ``lowrank/overlap_layer/<parameter name>`` for every refreshed weight.
        image_interval: draw the picture every this many refreshes (refreshes with at least one overlap) and at the
            end of training; None disables it.
        frozen_threshold: normalised overlap in (0, 1] above which a refresh counts as "frozen".
        frozen_patience: consecutive frozen refreshes before the (single) warning.

    Raises:
        ValueError: for an invalid argument.
        MisconfigurationException: in ``on_fit_start`` when no ``SubspaceResampler`` is attached.
    """

    def __init__(
        self,
        per_layer: bool = False,
        image_interval: int | None = 10,
        frozen_threshold: float = 0.9,
        frozen_patience: int = 3,
    ) -> None:
        if image_interval is not None and not (isinstance(image_interval, int) and image_interval >= 1):
            raise ValueError(f"image_interval: invalid value {image_interval!r}; accepted: an integer >= 1 or None")
        if not (isinstance(frozen_threshold, (int, float)) and 0.0 < frozen_threshold <= 1.0):
            raise ValueError(f"frozen_threshold: invalid value {frozen_threshold!r}; accepted: a number in (0, 1]")
        if not (isinstance(frozen_patience, int) and frozen_patience >= 1):
            raise ValueError(f"frozen_patience: invalid value {frozen_patience!r}; accepted: an integer >= 1")
        super().__init__()
        self.per_layer = per_layer
        self.image_interval = image_interval
        self.frozen_threshold = float(frozen_threshold)
        self.frozen_patience = frozen_patience
        self.num_refreshes = 0  # refreshes with at least one overlap
        self.frozen_streak = 0
        self.warned_frozen = False
        self._latest: dict[str, tuple[float, float]] = {}  # parameter name -> (latest overlap, chance)
        self._history: list[tuple[int, dict[str, float]]] = []  # (step, module type -> mean overlap)
        self._chance: float | None = None
        self._drawn_at = -1  # num_refreshes when the last picture was drawn
        self._images_disabled = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self.resamplers:
            raise MisconfigurationException(
                "SubspaceOverlapMonitor logs the refreshes made by SubspaceResampler, and none is attached: add "
                "SubspaceResampler() to the Trainer's callbacks (with its defaults it refreshes on the optimizer's "
                "own schedule, every update_gap steps)"
            )

    @rank_zero_only
    def on_refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list[RefreshRecord]) -> None:
        """Listener of :meth:`SubspaceResampler.subscribe`: logs one refresh (rank zero only)."""
        fresh = {normalize_param_name(r.name): (r.overlap, r.chance) for r in records if r.overlap is not None}
        if not fresh:
            return
        self._latest.update(fresh)
        metrics = overlap_metrics(self._latest)
        if self.per_layer:
            metrics.update({f"lowrank/overlap_layer/{name}": overlap for name, (overlap, _) in fresh.items()})
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.num_refreshes += 1
        self._remember(metrics, step)
        self._check_frozen(metrics, step)
        if self.image_interval is not None and self.num_refreshes % self.image_interval == 0:
            self._draw(trainer, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.image_interval is not None and self.num_refreshes > 0 and self._drawn_at != self.num_refreshes:
            self._draw(trainer, self._history[-1][0] if self._history else trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_refreshes": self.num_refreshes,
            "frozen_streak": self.frozen_streak,
            "warned_frozen": self.warned_frozen,
            "latest": {name: list(pair) for name, pair in self._latest.items()},
            "history": [[step, dict(values)] for step, values in self._history],
            "chance": self._chance,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_refreshes = int(state_dict.get("num_refreshes", 0))
        self.frozen_streak = int(state_dict.get("frozen_streak", 0))
        self.warned_frozen = bool(state_dict.get("warned_frozen", False))
        self._latest = {name: (float(o), float(c)) for name, (o, c) in state_dict.get("latest", {}).items()}
        self._history = [(int(step), dict(values)) for step, values in state_dict.get("history", [])]
        self._chance = state_dict.get("chance")
        self._drawn_at = self.num_refreshes

    # ------------------------------------------------------------------------------------------------ helpers
    def _remember(self, metrics: dict[str, float], step: int) -> None:
        prefix = "lowrank/overlap/"
        means = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and k != prefix + "mean"}
        self._history.append((step, means))
        if len(self._history) > _MAX_HISTORY:
            self._history = self._history[::2]
        self._chance = metrics["lowrank/overlap_chance/mean"]

    def _check_frozen(self, metrics: dict[str, float], step: int) -> None:
        value = metrics.get("lowrank/overlap_normalized/mean")
        self.frozen_streak = self.frozen_streak + 1 if value is not None and value > self.frozen_threshold else 0
        if self.frozen_streak >= self.frozen_patience and not self.warned_frozen:
            self.warned_frozen = True
            rank_zero_warn(
                "lowrank: the subspace is frozen: the mean normalised overlap (overlap - r/d) / (1 - r/d) stayed "
                f"above {self.frozen_threshold} for {self.frozen_streak} consecutive refreshes (latest {value:.3f} at "
                f"step {step}): new bases barely differ from the old ones, so the weights keep training in the same "
                "subspace. Try selector 'importance' or 'random', or "
                "SubspaceResampler(switch_at=..., switch_to='random')"
            )

    @rank_zero_only
    def _draw(self, trainer: pl.Trainer, step: int) -> None:
        self._drawn_at = self.num_refreshes
        if self._images_disabled:
            return
        writers = [getattr(logger, "experiment", None) for logger in trainer.loggers]
        writers = [w for w in writers if callable(getattr(w, "add_image", None))]
        if not writers or not self._latest:
            return
        cells = {(layer_label(name), module_type(name)): overlap for name, (overlap, _) in self._latest.items()}
        try:
            image = render_overlap_figure(cells, self._history, self._chance, step)
        except ImportError:
            self._images_disabled = True
            rank_zero_warn("SubspaceOverlapMonitor: matplotlib is not installed, so no overlap picture is drawn "
                           "(pip install matplotlib, or image_interval=None to silence this)")
            return
        for writer in writers:
            writer.add_image(IMAGE_TAG, image, step, dataformats="HWC")
