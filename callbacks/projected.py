"""``ProjectGradients``: projected-gradient training (:mod:`lowrank.projected`) in a Lightning run.

Backward forms each low-rank linear weight's gradient in its projected shape, R = dy^T (x B) (right side, B (n, r))
or R = (dy B)^T x (left side, B (m, r)), into a companion parameter ``<module>.weight_projected``; the full gradient
G = dy^T x only on the steps whose refresh needs it. Lightning's accumulation, clipping (which then sees ||R|| <= ||G||
for these weights), AMP unscaling and DDP's all-reduce treat R as an ordinary gradient.

Order, which Lightning fixes: the strategy wraps the model (DDP) before ``configure_optimizers`` runs, and under DDP
the weights must not require grad when it does (DDP would otherwise allocate and all-reduce an (m, n) zero gradient
every step). So ``setup`` registers the companions from the same optimizer config that ``configure_optimizers``
passes to ``lowrank.build_optimizer`` (which attaches them), freezing the weights when several processes train, and
``on_fit_start`` turns the mechanism on; ``teardown`` removes it (companions gone, weights as before).

Under FSDP2 (ModelParallelStrategy) ``setup`` runs before the module's ``configure_model``, whose ``fully_shard``
then shards the companions with the weights (``add_companions(..., fsdp2=True)``: the weights keep requires_grad).

Checks in ``setup``: ``PerLayerUpdates`` is refused; in ``on_fit_start``: exactly one ``LowRankOptimizer``, built
over the companions (else ``configure_optimizers`` did not use this config), and what
:func:`lowrank.projected.projected_problems` says.

Checkpoints: the companions are not in the model's state dict; the optimizer's keeps their group (last, without
state) and drops it on load; ``on_save_checkpoint`` drops it from the learning-rate schedulers' per-group lists
(``base_lrs``, ``lr_lambdas``...) and ``on_load_checkpoint`` adds that entry back (a copy of the last group's), so
either kind of run resumes as the other.

Use it with a :class:`SubspaceResampler` (it re-projects R on the refreshed bases before clipping). Under DDP pass
``DDPStrategy(gradient_as_bucket_view=True)`` so that DDP keeps no second copy of R.

Usage::

    config = {"name": "lowrank", "lr": 1e-3, "lowrank": {"rank": 128}}  # build_optimizer(self, config) in the module
    trainer = Trainer(callbacks=[ProjectGradients(config), SubspaceResampler()], ...)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lowrank.companions import companions_of
from lowrank.config import OptimizerConfig
from lowrank.projected import (
    ProjectedGradients,
    add_companions,
    enable_projected_gradients,
    projected_problems,
    remove_companions,
)
from lowrank_recipes.callbacks.lowrank_optimizer import find_lowrank_optimizer
from lowrank_recipes.callbacks.per_layer import PerLayerUpdates

WHO = "ProjectGradients"


class ProjectGradients(Callback):
    """Projected gradients for the low-rank weights of the run's ``LowRankOptimizer`` (module docstring).

    Args:
        optimizer_config: the optimizer config that ``configure_optimizers`` passes to ``lowrank.build_optimizer``
            (an :class:`lowrank.OptimizerConfig` or its mapping): it says which weights go low-rank, at which rank and
            side, before the optimizer exists.
    """

    def __init__(self, optimizer_config: OptimizerConfig | Mapping[str, Any]) -> None:
        self.optimizer_config = optimizer_config
        self.names: list[str] = []
        self._handle: ProjectedGradients | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        problems = []
        if any(isinstance(cb, PerLayerUpdates) for cb in trainer.callbacks):
            problems.append("PerLayerUpdates steps inside backward from the full gradient: use one or the other")
        if problems:
            raise MisconfigurationException(f"{WHO}: " + "; ".join(problems))
        # before configure_model's fully_shard (FSDP2 shards the companions too) and before DDP wraps the model
        fsdp2 = isinstance(trainer.strategy, ModelParallelStrategy)
        self.names = add_companions(pl_module, self.optimizer_config, fsdp2=fsdp2)
        if not self.names:
            raise MisconfigurationException(f"{WHO}: the optimizer config makes no weight low-rank (optimizer.name?)")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = find_lowrank_optimizer(trainer, WHO)
        problems = projected_problems(pl_module, optimizer)
        attached = set(map(id, optimizer.projected_weights()))
        missing = [name for name, (weight, _) in companions_of(pl_module).items() if id(weight) not in attached]
        if missing:
            problems.append(
                f"{missing[0]} and {len(missing) - 1} more weights have companions the optimizer does not step: build "
                "it in configure_optimizers with lowrank.build_optimizer(self, config) from the config given here"
            )
        if problems:
            raise MisconfigurationException(f"{WHO}: " + "; ".join(problems))
        self._handle = enable_projected_gradients(pl_module, optimizer)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._handle is None:
            return
        groups = len(self._handle.optimizer.param_groups)  # the companions' group is the last
        for state in checkpoint.get("lr_schedulers", []):
            for key, value in list(state.items()):
                if isinstance(value, list) and len(value) == groups:
                    state[key] = value[:-1]

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get("optimizer_states") or []
        if len(saved) != 1 or "param_groups" not in saved[0]:
            return
        groups = sum(not g.get("companions") for g in saved[0]["param_groups"])  # without the companions' group
        for state in checkpoint.get("lr_schedulers", []):
            for key, value in list(state.items()):
                if isinstance(value, list) and value and len(value) == groups:
                    state[key] = [*value, copy.deepcopy(value[-1])]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        elif self.names:  # the run stopped before on_fit_start
            remove_companions(pl_module)
        self.names = []
