"""Projected-gradient training: the gradient of a low-rank linear weight is formed in its projected shape in backward.

For y = x W^T with W (m, n), inputs x (N, n) over N tokens and the output gradient dy (N, m), the weight gradient is
G = dy^T x, but the low-rank optimizer only uses its projection R on the basis B:

* right side (B (n, r)):  R = G B   = dy^T (x B)   (m, r)
* left side  (B (m, r)):  R = B^T G = (dy B)^T x   (r, n)

computed in that order: N r (m + n) multiply-adds instead of N m n + m n r, and no (m, n) buffer. dx = dy W is
unchanged. R lands in the gradient of a *companion* parameter of R's shape registered on the module
(``<module>.weight_projected``), so accumulation over micro-batches and gradient clipping treat it as an ordinary
gradient (clipping then sees ||R|| <= ||G|| for these weights); the optimizer hands it to the weight's stand-in and
steps the projected weights one at a time (one R-sized workspace at a time). The companion's values are never used: from
the first step on it is a zero-stride view of one zero (no memory). The weight itself gets no gradient, except on the
steps whose refresh needs G: the optimizer's schedule says before the forward pass which weights refresh at the coming
step (``optimizer.due()``, plus those without a basis yet), the decision is taken at forward time and kept in the
autograd context (activation checkpointing's recomputation sees the same one), and on those steps backward forms G as
usual; the optimizer refreshes the basis from G and recomputes R = project(G, B_new) before updating.

    handle = enable_projected_gradients(model, optimizer)   # before training; a LowRankOptimizer over model
    for batch in data:
        loss(batch).backward()       # R into companions; G only for the weights refreshing at this step
        optimizer.step()
        optimizer.zero_grad()
    handle.remove()                  # the modules' own forward back, companions removed

The companions are listed in the optimizer's param groups (a last group named ``projected``, left out of its
``state_dict``), so that ``zero_grad``, AMP unscaling and gradient clipping see R; they are left out of the model's
``state_dict`` too (they have no value to keep): a checkpoint of a projected run is that of an ordinary one, and
either resumes as the other.

Several processes (DDP): the weight must not require grad when DDP wraps the model, else DDP allocates and
all-reduces an (m, n) zero gradient every step; so with an initialised process group of several ranks the weights
are frozen (``requires_grad=False``, still stepped by the optimizer) and backward accumulates G into ``W.grad`` itself
on refresh steps; the optimizer averages it over the ranks (one all-reduce per refreshing weight) before the refresh.
DDP all-reduces R as the companions' gradient; use ``gradient_as_bucket_view=True`` so that it keeps no second copy.
Order in a plain loop: model, optimizer, ``enable_projected_gradients``, then the DDP wrapper, then any LR scheduler.
When the optimizer is built inside the wrapper (Lightning's ``configure_optimizers``), register the companions
first from the optimizer config with :func:`add_companions` (``build_optimizer`` attaches them), and enable after.

The weights are equal to the ordinary path's (tests/lowrank/test_projected.py: float64, both sides, every moment
policy, gradient accumulation, torch.compile around the model; tests/distributed: 2 DDP ranks). Per-layer updates and
Fira (which need G at every step) are refused. FSDP2: :func:`add_companions` with ``fsdp2=True`` before
``fully_shard`` (tests/distributed/test_projected_fsdp2.py).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.companions import COMPANION, companions_of
from lowrank.dtensor import is_dtensor, local
from lowrank.factory import lowrank_plan
from lowrank.optimizer import LowRankOptimizer
from lowrank.projector import projected_shape
from lowrank.split_refresh import world

__all__ = ["COMPANION", "ProjectedGradients", "add_companions", "enable_projected_gradients", "remove_companions"]


class _ProjectedLinear(torch.autograd.Function):
    """y = x W^T; backward: dx = dy W, the companion's gradient R on ``basis`` (zero without one), and W's gradient G
    only when ``full`` (a refresh step)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        companion: torch.Tensor,
        basis: torch.Tensor | None,
        side: str,
        full: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, basis)
        ctx.side, ctx.full, ctx.weight = side, full, weight
        ctx.companion = companion  # its shape; FSDP2: its gradient is set here, not returned (add_companions)
        device = x.device.type  # backward runs under the forward's autocast state (as torch.amp.custom_bwd does)
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.autocast is None:
            return _ProjectedLinear._backward(ctx, dy)
        with torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1]):
            return _ProjectedLinear._backward(ctx, dy)

    @staticmethod
    def _backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, basis = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None  # (..., n)
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (N, n), (N, m)
        grad_w = dy2.T @ x2 if ctx.full else None  # (m, n), refresh steps only
        if grad_w is not None and not ctx.needs_input_grad[1]:  # W kept out of autograd (DDP): G accumulates here
            param = ctx.weight
            if param.grad is None:
                param.grad = grad_w.to(param.dtype)
            else:
                param.grad.add_(grad_w)
        if basis is None or grad_w is not None:
            # no basis yet, or a refresh step: the optimizer projects G on the new basis right after the refresh,
            # replacing whatever R holds (zeros here: the companion still gets a gradient, as DDP needs)
            low = torch.zeros(ctx.companion.shape, dtype=dy.dtype, device=dy.device)
        elif ctx.side == "right":
            low = dy2.T @ (x2 @ basis)  # (m, N) (N, r) -> (m, r)
        else:
            low = (dy2 @ basis).T @ x2  # (r, N) (N, n) -> (r, n)
        if not ctx.needs_input_grad[2]:  # FSDP2 companions do not require grad: R accumulates into .grad here
            holder = ctx.companion
            holder.grad = low.to(holder.dtype) if holder.grad is None else holder.grad.add_(low)
            low = None
        return dx, grad_w if ctx.needs_input_grad[1] else None, low, None, None, None


class ProjectedGradients:
    """Projected gradients for every low-rank ``nn.Linear`` weight of ``optimizer`` inside ``model`` (module
    docstring); build it with :func:`enable_projected_gradients`."""

    def __init__(self, model: nn.Module, optimizer: LowRankOptimizer) -> None:
        problems = projected_problems(model, optimizer)
        if problems:
            raise ValueError("projected gradients: " + "; ".join(problems))
        self.optimizer = optimizer
        owners = _owners(model)
        self._patched: list[tuple[nn.Module, torch.Tensor]] = []
        self._due_at: tuple[tuple[int, ...], set[str]] | None = None
        for group, name, param in _lowrank(optimizer):
            module = owners[id(param)]
            side = optimizer.side_of(param)
            if param not in optimizer._companions:  # else registered before the optimizer (add_companions)
                optimizer.attach_companion(param, _register(module, param, group["rank"], side))
            module.forward = types.MethodType(_forward(self, name, param, side), module)
            self._patched.append((module, param))

    def full_gradient(self, name: str, param: torch.Tensor) -> bool:
        """Whether the coming optimizer step needs ``param``'s full gradient: it refreshes at that step, or it has no
        basis yet. Computed once per step (the schedule is a function of the step)."""
        step = tuple(g["lowrank_step"] for g in self.optimizer.param_groups if g["rank"] is not None)
        if self._due_at is None or self._due_at[0] != step:
            self._due_at = (step, {due.name for due in self.optimizer.due()})
        return name in self._due_at[1]

    def remove(self) -> None:
        """Restores the modules' own forward and removes the companions (the optimizer steps ordinarily again)."""
        for module, param in self._patched:
            del module.forward  # the instance attribute: the class's forward again
            self.optimizer.detach_companion(param)
            _unregister(module, param)
        self._patched = []


def _register(
    module: nn.Module, param: torch.Tensor, rank: int, side: str, freeze: bool | None = None, fsdp2: bool = False
) -> nn.Parameter:
    """Registers ``module.weight_projected`` (R's shape) for ``param`` = ``module.weight``; marks both; freezes the
    weight when ``freeze`` (None: when several processes train; DDP, module docstring); leaves the companion out of
    the module's state dict."""
    shape = projected_shape(param.shape, side, rank)
    companion = nn.Parameter(torch.zeros(shape, **_like(param)), requires_grad=not fsdp2)
    companion._lowrank_companion = True  # type: ignore[attr-defined]
    module.register_parameter(COMPANION, companion)
    param._lowrank_projected = companion  # type: ignore[attr-defined]
    if (world()[1] > 1 if freeze is None else freeze) and param.requires_grad and not fsdp2:
        param.requires_grad_(False)
        param._lowrank_frozen = True  # type: ignore[attr-defined]
    module._lowrank_hooks = (  # type: ignore[assignment]
        module._register_state_dict_hook(_drop_companion),
        module.register_load_state_dict_post_hook(_companion_not_missing),
    )
    return companion


def _unregister(module: nn.Module, param: torch.Tensor) -> None:
    delattr(module, COMPANION)
    for handle in module.__dict__.pop("_lowrank_hooks", ()):
        handle.remove()
    param.__dict__.pop("_lowrank_projected", None)
    if getattr(param, "_lowrank_frozen", False):
        param.requires_grad_(True)
        del param._lowrank_frozen  # type: ignore[attr-defined]


def _drop_companion(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + COMPANION, None)


def _companion_not_missing(module: nn.Module, incompatible: Any) -> None:
    """A state dict without companions (every state dict: they are left out) loads strictly into a projected model;
    a companion has no value to restore."""
    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if not key.endswith(COMPANION)]


def remove_companions(model: nn.Module) -> None:
    """Removes every companion :func:`add_companions` registered on ``model`` (weights as before), for a model whose
    optimizer never took them (a run that failed before projected gradients were enabled)."""
    owners = _owners(model)
    for weight, _ in companions_of(model).values():
        _unregister(owners[id(weight)], weight)


def add_companions(model: nn.Module, config: Any, freeze: bool | None = None, fsdp2: bool = False) -> list[str]:
    """Registers the companions of every weight that ``lowrank.build_optimizer(model, config)`` will make low-rank,
    before the optimizer exists and before a data-parallel wrapper sees the model (module docstring);
    ``build_optimizer`` attaches them, :func:`enable_projected_gradients` then turns the mechanism on. Returns the
    weights' names; a weight that has one already is left as it is.

    ``freeze``: take the weights out of autograd (``requires_grad=False``; backward then accumulates G into
    ``W.grad`` itself on refresh steps), which DDP needs; None: when a process group of several ranks is initialised.
    ``fsdp2``: for a model that ``fully_shard`` will shard next (which shards the companions too): the weights keep
    requires_grad (backward returns G on refresh steps only, which FSDP2 reduce-scatters), and the companions do not
    require grad: backward sets their gradient itself, which FSDP2 reduce-scatters all the same, while
    torch.distributed.checkpoint's strict optimizer load then asks no state of them."""
    owners = _owners(model)
    names = []
    for name, param, rank, side in lowrank_plan(model, config):
        module = owners.get(id(param))
        if not isinstance(module, nn.Linear):
            raise ValueError(f"projected gradients: {name}: only nn.Linear weights can be projected")
        if is_dtensor(param):
            raise ValueError(
                f"projected gradients: {name} is sharded already: register the companions before fully_shard "
                "(add_companions(model, config, fsdp2=True), then fully_shard)"
            )
        if COMPANION not in module._parameters:
            _register(module, param, rank, side, freeze, fsdp2)
        names.append(name)
    return names


def _forward(manager: ProjectedGradients, name: str, param: torch.Tensor, side: str) -> Callable[..., torch.Tensor]:
    def forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        companion = getattr(module, COMPANION)
        basis = manager.optimizer.state.get(param, {}).get("lowrank_basis")
        basis = None if basis is None else local(basis)  # FSDP2: a replicated DTensor; its local tensor is whole
        full = manager.full_gradient(name, param)
        y = _ProjectedLinear.apply(x, module.weight, companion, basis, side, full)
        return y if module.bias is None else y + module.bias

    return forward


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(weight) -> the module that holds it as its own ``weight`` (the optimizer may name parameters relative to a
    submodule of ``model``, so owners are found by identity, not by name)."""
    return {id(w): m for m in model.modules() if (w := m._parameters.get("weight")) is not None}


def _lowrank(optimizer: LowRankOptimizer) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    return [
        (group, name, param)
        for group in optimizer.param_groups
        if group["rank"] is not None
        for name, param in zip(group["param_names"], group["params"])
    ]


def _like(param: torch.Tensor) -> dict[str, Any]:
    return {"dtype": param.dtype, "device": param.device}


def projected_problems(model: nn.Module, optimizer: Any) -> list[str]:
    """Everything that stops projected gradients on ``model`` with ``optimizer``, each said once."""
    if not isinstance(optimizer, LowRankOptimizer):
        return [f"needs a LowRankOptimizer (optimizer.name: lowrank), got {type(optimizer).__name__}"]
    problems = []
    owners = _owners(model)
    for group, name, param in _lowrank(optimizer):
        module = owners.get(id(param))
        if not isinstance(module, nn.Linear):
            problems.append(f"{name}: only nn.Linear weights can be projected (owner: {type(module).__name__})")
        elif is_dtensor(param) and not is_dtensor(optimizer._companions.get(param)):
            problems.append(
                f"{name}: a sharded (FSDP2) weight needs its companion registered before fully_shard "
                "(add_companions(model, config, freeze=False), then fully_shard, then build_optimizer)"
            )
        elif group["fira"]:
            problems.append(f"{name}: Fira's residual needs the full gradient at every step (lowrank.fira: false)")
    if optimizer.per_layer is not None:
        problems.append("per-layer updates step inside backward from the full gradient: use one or the other")
    return problems


def enable_projected_gradients(model: nn.Module, optimizer: LowRankOptimizer) -> ProjectedGradients:
    """Forms the low-rank weights' gradients in projected form from now on (module docstring); returns the handle
    whose ``remove()`` turns it off. Call it before any step and before a data-parallel wrapper sees the model."""
    return ProjectedGradients(model, optimizer)
