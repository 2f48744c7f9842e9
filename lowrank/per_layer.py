"""Per-layer weight updates: each weight is stepped inside backward as soon as its gradient is accumulated.

    updater = enable_per_layer(optimizer, clip_norm=1.0)   # registers one hook per parameter
    for batch in data:
        loss(batch).backward()    # per weight: clip its gradient, refresh its basis when due, update, free the gradient
        optimizer.step()          # finishes the step: advances the step counters (no second update)
        optimizer.zero_grad()     # harmless (the gradients are already gone)
    updater.remove()

Every parameter's update is :meth:`LowRankOptimizer.step_parameter`, the same code as :meth:`LowRankOptimizer.step`
(plain parameters get the base update, low-rank ones the projected one; a basis is refreshed when the optimizer's
:class:`lowrank.RefreshSchedule` says it is due, stagger and selector switch included, or when it has none yet). The
gradient is freed right after, so the full-size gradients of all layers never coexist: at most one is alive at a time.
Refresh listeners are called after ``optimizer.step()``, with records that carry the overlap but not the old basis.
The state dict is unchanged, so checkpoints are interchangeable with ordinary steps.

What it cannot honour raises instead of updating wrongly:

* gradient accumulation (several backwards per optimizer step): a weight stepped twice before ``optimizer.step()``
  raises inside the second backward;
* global-norm clipping (it needs every gradient at once): only per-parameter clipping (``clip_norm``) is offered; a
  ``clip_grad_norm_`` over all parameters after backward sees no gradient, so do not call one;
* ``resample()`` (the gradients are gone when it would run) and a schedule with ``split_across_ranks``;
* DDP / FSDP / more than one process: the hooks would step before gradients are reduced.

Lightning checks (accumulate_grad_batches, gradient_clip_val, strategy, AMP scaler) live in
``lowrank_recipes.callbacks.per_layer``.
"""

from __future__ import annotations

from typing import Any

import torch

from lowrank.checks import is_number
from lowrank.optimizer import LowRankOptimizer


class PerLayerUpdater:
    """The hooks of per-layer updates on one :class:`LowRankOptimizer` (build it with :func:`enable_per_layer`).

    Args:
        optimizer: the optimizer whose parameters are stepped inside backward.
        clip_norm: clip each parameter's gradient to this L2 norm before its update (as
            ``torch.nn.utils.clip_grad_norm_([p], clip_norm)`` on each parameter separately); None: no clipping.
    """

    def __init__(self, optimizer: LowRankOptimizer, clip_norm: float | None = None) -> None:
        problems = per_layer_problems(optimizer, clip_norm)
        if problems:
            raise ValueError("per-layer updates: " + "; ".join(problems))
        self.optimizer = optimizer
        self.clip_norm = clip_norm
        self._stepped: set[int] = set()  # ids of the parameters already updated in the current optimizer step
        names = {p: n for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])}
        self._names = {id(p): n for p, n in names.items()}
        # Parameters added to the optimizer later get no hook: step() updates them ordinarily.
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in names if p.requires_grad]
        self._handles.append(optimizer.register_step_post_hook(self._step_done))
        optimizer.per_layer = self

    def _hook(self, param: torch.Tensor) -> None:
        if id(param) in self._stepped:
            raise RuntimeError(
                f"per-layer updates: parameter {self._names[id(param)]!r} got a second gradient before "
                "optimizer.step(): each weight is updated inside backward, so only one backward per optimizer step "
                "is possible (no gradient accumulation; call optimizer.step() after every backward, or disable "
                "per-layer updates to accumulate)"
            )
        self._stepped.add(id(param))
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([param], self.clip_norm)
        self.optimizer.step_parameter(param)
        param.grad = None  # frees the full-size gradient now

    def _step_done(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped.clear()

    def remove(self) -> None:
        """Removes the hooks: the optimizer steps ordinarily again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stepped.clear()
        if self.optimizer.per_layer is self:
            self.optimizer.per_layer = None


def per_layer_problems(optimizer: Any, clip_norm: Any = None) -> list[str]:
    """Every reason why per-layer updates cannot run on ``optimizer`` (empty: they can)."""
    if not isinstance(optimizer, LowRankOptimizer):
        return [f"need a lowrank.LowRankOptimizer, got {type(optimizer).__name__}"]
    problems = []
    if clip_norm is not None and not (is_number(clip_norm) and clip_norm > 0):
        problems.append(f"clip_norm: invalid value {clip_norm!r}; accepted: a number > 0 (per-parameter norm) or None")
    if optimizer.per_layer is not None:
        problems.append("already enabled on this optimizer (call remove() on the active updater first)")
    if optimizer.projected_weights():
        problems.append(
            "projected gradients are on (lowrank.projected): the weights get no full gradient to step on inside "
            "backward; use one or the other"
        )
    if optimizer.schedule.split_across_ranks:
        problems.append(
            "schedule.split_across_ranks is True: bases refresh inside backward one parameter at a time, with nothing "
            "to split; accepted with per-layer updates: False"
        )
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        problems.append(
            f"{dist.get_world_size()} processes: per-layer updates run on a single device (the hooks would step "
            "before DDP/FSDP reduce the gradients)"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(_is_sharded(p) for p in params):
        problems.append("sharded (FSDP/DTensor) parameters: per-layer updates run on a single device")
    return problems


def enable_per_layer(optimizer: LowRankOptimizer, clip_norm: float | None = None) -> PerLayerUpdater:
    """Steps every parameter of ``optimizer`` inside backward from now on (module docstring); returns the updater,
    whose ``remove()`` turns it off."""
    return PerLayerUpdater(optimizer, clip_norm)


def _is_sharded(param: torch.Tensor) -> bool:
    if getattr(param, "_fsdp_flattened", False):  # FSDP1 flat parameter
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(param, DTensor)  # FSDP2 / tensor parallel shard
