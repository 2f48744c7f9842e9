"""``SubspaceOverlapMonitor``: logs how far each refresh moved the subspaces (the frozen-subspace metric).

For a parameter refreshed from basis B_old to B_new (both (d, r), orthonormal columns) the overlap is
``||B_old^T B_new||_F^2 / r`` in [0, 1] (1: the subspace did not move; ``RefreshRecord.overlap``). Two independent
random r-dimensional subspaces of R^d overlap r/d on average (the chance level, ``RefreshRecord.chance``), so the
monitor logs beside it the chance level and the normalised overlap ``(overlap - r/d) / (1 - r/d)`` (0: chance,
1: frozen; full-rank weights, r = d, have no normalised value and are left out of it). The aggregation is
:func:`lowrank.overlap.overlap_metrics`, usable without Lightning.

Where the records come from: the monitor is a refresh listener of the run's ``LowRankOptimizer`` (a
:class:`lowrank_recipes.callbacks.RefreshSubscriber`), so it hears every refresh, whoever runs it: the
``SubspaceResampler``, the optimizer's own ``step()`` (no resampler attached), or per-layer updates inside backward.

Tags, logged after every optimizer step that refreshed a weight with an overlap (the first refresh of a parameter has
none), on rank zero through every logger of the trainer with ``step`` = the refresh step. The aggregates
average the *latest* overlap of every weight refreshed at least twice so far: without staggering that is exactly the
weights of this refresh; with staggering (one slice of layers per refresh) it keeps the curves model-wide instead of
zigzagging between slices.

* ``lowrank/overlap/<module_type>`` and ``lowrank/overlap/mean``: mean overlap of the weights of that module type
  (:func:`lowrank.names.module_types` over the optimizer's low-rank parameters: the leaf module, ``q_proj`` ...
  ``down_proj``, ``fc1`` for ``fc1.weight``, with its parent components where leaves collide: GPT-2's
  ``attn.c_proj`` and ``mlp.c_proj``), and of all of them;
* ``lowrank/overlap_chance/<module_type>``, ``lowrank/overlap_chance/mean``: the mean r/d of the same weights;
* ``lowrank/overlap_normalized/<module_type>``, ``lowrank/overlap_normalized/mean``: the mean normalised overlap;
* with ``per_layer=True``, ``lowrank/overlap_layer/<parameter name>`` for each weight refreshed at this step
  (wrapper prefixes such as ``_orig_mod.`` removed, as in :func:`lowrank.normalize_param_name`).

Every ``image_interval`` refreshes (and at the end of training) a picture (``lowrank/overlap_heatmap``, see
:mod:`lowrank_recipes.callbacks.overlap_figure`; each module type with its own chance level) goes to every logger
whose ``experiment`` has ``add_image`` (TensorBoard); other loggers are skipped silently. When
``lowrank/overlap_normalized/mean`` is above ``frozen_threshold`` at ``frozen_patience`` consecutive refreshes it warns
once that the subspace is frozen.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lowrank import RefreshRecord, normalize_param_name
from lowrank.checks import raise_problems
from lowrank.names import layer_label, lowrank_param_names, module_types
from lowrank.overlap import OverlapMonitorOptions, chance_by_type, overlap_metrics
from lowrank_recipes.callbacks.overlap_figure import render_overlap_figure
from lowrank_recipes.callbacks.subscriber import RefreshSubscriber

IMAGE_TAG = "lowrank/overlap_heatmap"
_MAX_HISTORY = 1000  # refreshes kept for the picture; beyond it every other one is dropped


class SubspaceOverlapMonitor(RefreshSubscriber):
    """Logs the subspace overlap of every refresh of the trainer's ``LowRankOptimizer`` (module docstring).

    Args: the fields of :class:`lowrank.overlap.OverlapMonitorOptions`:
        per_layer: also log ``lowrank/overlap_layer/<parameter name>`` for every refreshed weight.
        image_interval: draw the picture every this many refreshes (refreshes with at least one overlap) and at the
            end of training; None disables it.
        frozen_threshold: normalised overlap in (0, 1] above which a refresh counts as "frozen".
        frozen_patience: consecutive frozen refreshes before the (single) warning.

    Raises:
        ValueError: for an invalid argument.
        MisconfigurationException: in ``on_fit_start`` when the optimizer is not one ``LowRankOptimizer``.
    """

    def __init__(
        self,
        per_layer: bool = False,
        image_interval: int | None = 10,
        frozen_threshold: float = 0.9,
        frozen_patience: int = 3,
    ) -> None:
        options = OverlapMonitorOptions(per_layer, image_interval, frozen_threshold, frozen_patience)
        raise_problems("SubspaceOverlapMonitor", options.problems())
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
        self._names: list[str] = []  # every low-rank parameter's name: module types are told apart among them
        self._drawn_at = -1  # num_refreshes when the last picture was drawn
        self._images_disabled = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        names = lowrank_param_names(self.lowrank_optimizer.param_groups)
        self._names = [normalize_param_name(name) for name in names]

    @rank_zero_only
    def on_refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list[RefreshRecord]) -> None:
        """Refresh listener: logs one optimizer step's refreshes (rank zero only)."""
        fresh = {normalize_param_name(r.name): (r.overlap, r.chance) for r in records if r.overlap is not None}
        if not fresh:
            return
        self._latest.update(fresh)
        metrics = overlap_metrics(self._latest, self._names)
        if self.per_layer:
            metrics.update({f"lowrank/overlap_layer/{name}": overlap for name, (overlap, _) in fresh.items()})
        step = max(r.step for r in records)
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
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_refreshes = int(state_dict.get("num_refreshes", 0))
        self.frozen_streak = int(state_dict.get("frozen_streak", 0))
        self.warned_frozen = bool(state_dict.get("warned_frozen", False))
        self._latest = {name: (float(o), float(c)) for name, (o, c) in state_dict.get("latest", {}).items()}
        self._history = [(int(step), dict(values)) for step, values in state_dict.get("history", [])]
        self._drawn_at = self.num_refreshes

    # ------------------------------------------------------------------------------------------------ helpers
    def _remember(self, metrics: dict[str, float], step: int) -> None:
        prefix = "lowrank/overlap/"
        means = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix) and k != prefix + "mean"}
        self._history.append((step, means))
        if len(self._history) > _MAX_HISTORY:
            self._history = self._history[::2]

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
                "a selector switch on the refresh schedule (switch_at=..., switch_to='random')"
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
        types = module_types({*self._latest, *self._names})
        cells = {(layer_label(name), types[name]): overlap for name, (overlap, _) in self._latest.items()}
        chances = chance_by_type(self._latest, self._names)
        try:
            image = render_overlap_figure(cells, self._history, chances, step)
        except ImportError:
            self._images_disabled = True
            rank_zero_warn(
                "SubspaceOverlapMonitor: matplotlib is not installed, so no overlap picture is drawn "
                "(pip install matplotlib, or image_interval=None to silence this)"
            )
            return
        for writer in writers:
            writer.add_image(IMAGE_TAG, image, step, dataformats="HWC")
