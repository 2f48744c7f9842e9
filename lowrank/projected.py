"""Projected-gradient training: the gradient of a low-rank linear weight is formed in its projected shape in backward.

For y = x W^T with W (m, n), inputs x (N, n) over N tokens and the output gradient dy (N, m), the weight gradient is
G = dy^T x, but the low-rank optimizer only uses its projection R on the basis B:

* right side (B (n, r)):  R = G B   = dy^T (x B)   (m, r)
* left side  (B (m, r)):  R = B^T G = (dy B)^T x   (r, n)

computed in that order: N r (m + n) multiply-adds instead of N m n + m n r, and no (m, n) buffer. dx = dy W is
unchanged. R lands in the gradient of a *companion* parameter of R's shape registered on the module
(``<module>.weight_projected``), so accumulation over micro-batches and gradient clipping treat it as an ordinary
gradient (clipping then sees ||R|| <= ||G|| for these weights); the optimizer steps the companion as the base
optimizer's stand-in. The weight itself gets no gradient, except on the steps whose refresh needs G: the
optimizer's schedule says before the forward pass which weights refresh at the coming step (``optimizer.due()``,
plus those without a basis yet), the decision is taken at forward time and kept in the autograd context (activation
checkpointing's recomputation sees the same one), and on those steps backward forms G as usual; the optimizer
refreshes the basis from G and recomputes R = project(G, B_new) before updating.

    handle = enable_projected_gradients(model, optimizer)   # before training; a LowRankOptimizer over model
    for batch in data:
        loss(batch).backward()       # R into companions; G only for the weights refreshing at this step
        optimizer.step()
        optimizer.zero_grad()
    handle.remove()                  # the modules' own forward back, companions removed

The weights are equal to the ordinary path's (tests/lowrank/test_projected.py: float64, both sides, every moment
policy, gradient accumulation). One device here; per-layer updates and Fira (which need G at every step) are
refused.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.dtensor import is_dtensor
from lowrank.optimizer import LowRankOptimizer
from lowrank.projector import project, projected_shape

COMPANION = "weight_projected"


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
        ctx.side, ctx.full, ctx.companion_shape = side, full, companion.shape
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, basis = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None  # (..., n)
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (N, n), (N, m)
        grad_w = dy2.T @ x2 if ctx.full else None  # (m, n), refresh steps only
        if basis is None:  # no basis yet (first step): the optimizer projects G once it has one
            low = torch.zeros(ctx.companion_shape, dtype=dy.dtype, device=dy.device)
        elif grad_w is not None:
            low = project(grad_w, basis, ctx.side)
        elif ctx.side == "right":
            low = dy2.T @ (x2 @ basis)  # (m, N) (N, r) -> (m, r)
        else:
            low = (dy2 @ basis).T @ x2  # (r, N) (N, n) -> (r, n)
        return dx, grad_w, low, None, None, None


class ProjectedGradients:
    """Projected gradients for every low-rank ``nn.Linear`` weight of ``optimizer`` inside ``model`` (module
    docstring); build it with :func:`enable_projected_gradients`."""

    def __init__(self, model: nn.Module, optimizer: LowRankOptimizer) -> None:
        problems = projected_problems(model, optimizer)
        if problems:
            raise ValueError("projected gradients: " + "; ".join(problems))
        self.optimizer = optimizer
        modules = dict(model.named_modules())
        self._patched: list[tuple[nn.Module, torch.Tensor]] = []
        self._due_at: tuple[tuple[int, ...], set[str]] | None = None
        for group, name, param in _lowrank(optimizer):
            module = modules[name.rsplit(".", 1)[0]]
            side = optimizer.side_of(param)
            companion = nn.Parameter(torch.zeros(projected_shape(param.shape, side, group["rank"]), **_like(param)))
            module.register_parameter(COMPANION, companion)
            optimizer.attach_companion(param, companion)
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
            delattr(module, COMPANION)
        self._patched = []


def _forward(manager: ProjectedGradients, name: str, param: torch.Tensor, side: str) -> Callable[..., torch.Tensor]:
    def forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        companion = getattr(module, COMPANION)
        basis = manager.optimizer.state.get(param, {}).get("lowrank_basis")
        full = manager.full_gradient(name, param)
        y = _ProjectedLinear.apply(x, module.weight, companion, basis, side, full)
        return y if module.bias is None else y + module.bias

    return forward


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
    modules = dict(model.named_modules())
    for group, name, param in _lowrank(optimizer):
        owner = name.rsplit(".", 1)
        module = modules.get(owner[0]) if len(owner) == 2 and owner[1] == "weight" else None
        if not isinstance(module, nn.Linear) or module.weight is not param:
            problems.append(f"{name}: only nn.Linear weights can be projected (owner: {type(module).__name__})")
        elif is_dtensor(param):
            problems.append(f"{name}: sharded (FSDP2) weights are not supported yet")
        elif group["fira"]:
            problems.append(f"{name}: Fira's residual needs the full gradient at every step (lowrank.fira: false)")
    if optimizer.per_layer is not None:
        problems.append("per-layer updates step inside backward from the full gradient: use one or the other")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        problems.append(f"{dist.get_world_size()} processes: projected gradients run on one device for now")
    return problems


def enable_projected_gradients(model: nn.Module, optimizer: LowRankOptimizer) -> ProjectedGradients:
    """Forms the low-rank weights' gradients in projected form from now on (module docstring); returns the handle
    whose ``remove()`` turns it off. Call it before any step and before a data-parallel wrapper sees the model."""
    return ProjectedGradients(model, optimizer)
