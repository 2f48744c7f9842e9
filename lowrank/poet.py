"""POET in any training loop: swap the targeted linears for :class:`POETLinear`, train the generators, merge.

    W = R W0 P,  R, P orthogonal (Cayley-Neumann blocks, block-stochastic), W0 fixed between merges

1. ``apply_poet(model, config, targets, seed)`` replaces every ``nn.Linear`` whose weight name matches a target
   pattern (the low-rank optimizer's ``optimizer.lowrank.targets``: attention and MLP projections) by a
   :class:`POETLinear` whose W0 is a normalized Gaussian (unit-norm rows, drawn under the randomness rule: the same on
   every rank and in every resumed run) or the layer's own weight (``init: normal``, the model's initialisation).
   Embeddings, the head and norms are untouched and train as usual.
2. ``build_optimizer(model, {"name": "poet", ...})`` puts the generators in a ``poet`` group (lr ``poet.lr``, no
   weight decay) and the rest in AdamW's usual groups (``lr``).
3. After optimizer step s (0-based), when ``merge_due(s, config)``: ``merge_poet(model, optimizer, s + 1)`` folds each
   rotation into its W0 (W0 <- R W0 P: the logits do not change), draws new permutations for step s + 1, zeroes the
   generators in place and resets their optimizer state (moments, step: bias correction restarts; 8-bit codes and
   scales too). The schedule is :class:`lowrank.RefreshSchedule`'s rule with ``update_gap = merge_every``: the merge
   after step s is the refresh "at step s + 1", never at step 0.

A plain loop::

    apply_poet(model, poet_config, targets, seed)
    optimizer = build_optimizer(model, {"name": "poet", "poet": {...}})
    for step, batch in enumerate(batches):
        loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
        if merge_due(step, poet_config):
            merge_poet(model, optimizer, step + 1)

Under FSDP2 the merge needs whole rows of W0 (refused: ``fsdp2`` is not accepted with POET); DDP works unchanged
(every rank merges the same replicated weights and draws the same permutations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from lowrank.checks import check, is_int, is_number
from lowrank.poet_linear import POETLinear
from lowrank.randomness import draw_generator
from lowrank.schedule import RefreshSchedule
from lowrank.targets import match_targets

POET_INITS: tuple[str, ...] = ("normalized", "normal")


@dataclasses.dataclass
class PoetConfig:
    """POET settings (``optimizer.poet.*``). Defaults are the reference code's where it has one.

    Attributes:
        block_size: b, side of the orthogonal blocks of R and P (reference: 256; the paper also reports b = d/4 and
            d/2). Trainable per m x n weight: (floor(m/b) + floor(n/b)) b(b-1)/2.
        merge_every: T_m, optimizer steps between merges (reference: 200).
        neumann_terms: k, terms of the Cayley-Neumann series (4: orthogonality error about ||Q||^10).
        lr: learning rate of the generators (reference: 0.002); the other parameters use ``optimizer.lr``.
        init: W0 at the start: ``normalized`` (Gaussian with unit-norm rows, the paper's best) or ``normal`` (the
            layer's own initialisation: for the recipe's LLaMA, N(0, 0.02)).
        stagger: k, merge slices of the layers at different steps of a period (1: all at once; as
            ``optimizer.refresh.stagger``).
        max_merge_error: the largest orthogonality error e = max ||G^T G - I||_2 a merge accepts. A merge moves W's
            singular values by factors within [sqrt(1 - e), sqrt(1 + e)] for good; at e >= 1 a block may be singular
            and erase directions of W0. The series has then left its range (||Q||_2 near or past 1): the merge
            raises :class:`PoetMergeError` instead, before touching any weight.
    """

    ACCEPTED_INITS: ClassVar[tuple[str, ...]] = POET_INITS

    block_size: int = 256
    merge_every: int = 200
    neumann_terms: int = 4
    lr: float = 0.002
    init: str = "normalized"
    stagger: int = 1
    max_merge_error: float = 1.0

    def problems(self, prefix: str = "optimizer.poet") -> list[str]:
        return [
            *check(is_int(self.block_size, 2), f"{prefix}.block_size", self.block_size, "an integer >= 2"),
            *check(is_int(self.merge_every, 1), f"{prefix}.merge_every", self.merge_every, "an integer >= 1"),
            *check(is_int(self.neumann_terms, 1), f"{prefix}.neumann_terms", self.neumann_terms, "an integer >= 1"),
            *check(is_number(self.lr) and self.lr > 0, f"{prefix}.lr", self.lr, "a finite number > 0"),
            *check(self.init in POET_INITS, f"{prefix}.init", self.init, " | ".join(POET_INITS)),
            *check(is_int(self.stagger, 1), f"{prefix}.stagger", self.stagger, "an integer >= 1 (1: no staggering)"),
            *check(
                is_number(self.max_merge_error) and self.max_merge_error > 0,
                f"{prefix}.max_merge_error",
                self.max_merge_error,
                "a finite number > 0",
            ),
        ]

    def schedule(self) -> RefreshSchedule:
        """The merge schedule as a refresh schedule: the merge after step s is its refresh at step s + 1."""
        return RefreshSchedule(update_gap=self.merge_every, stagger=self.stagger)


class PoetMergeError(RuntimeError):
    """A due merge whose rotations are too far from orthogonal (``PoetConfig.max_merge_error``); nothing was merged."""


def poet_modules(model: nn.Module) -> list[tuple[str, POETLinear]]:
    """(module name, module) of every POETLinear in ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, POETLinear)]


def normalized_gaussian(shape: tuple[int, int], seed: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    """(m, n) Gaussian with unit-norm rows, drawn on the CPU from the generator of (seed, 0, name)."""
    w = torch.randn(shape, generator=draw_generator(seed, 0, name + ".w0"), dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).to(dtype)


def apply_poet(model: nn.Module, config: PoetConfig, targets: Sequence[str], seed: int) -> list[str]:
    """Replaces the targeted ``nn.Linear`` modules of ``model`` by :class:`POETLinear`, in place.

    Args:
        model: any module; its linears named by ``targets`` are swapped (on their own device and dtype).
        config: block size, series terms, init.
        targets: regular expressions searched in weight names (``layers.0.mlp.up_proj.weight``); each must match.
        seed: run seed of W0's draw and the permutations.

    Returns:
        The swapped weights' names (``<module>.weight``), in module order.

    Raises:
        ValueError: a pattern is not a regular expression or matches no linear's weight; the model already holds
            POET layers.
    """
    problems = config.problems()
    if problems:
        raise ValueError("invalid POET configuration: " + "; ".join(problems))
    if poet_modules(model):
        raise ValueError("apply_poet: the model already holds POETLinear layers (apply it once)")
    linears = {f"{name}.weight": (name, module) for name, module in model.named_modules() if type(module) is nn.Linear}
    matched = match_targets(
        list(linears),
        targets,
        "nn.Linear weight; accepted: regular expressions that match at least one linear layer's weight name",
    )
    chosen = [linears[weight_name] for weight_name in matched]
    swapped = []
    for name, linear in chosen:
        weight_name = f"{name}.weight"
        w = linear.weight
        if config.init == "normalized":
            w0 = normalized_gaussian(tuple(w.shape), seed, weight_name, w.dtype).to(w.device)
        else:
            w0 = w.detach()
        layer = POETLinear(w0, config.block_size, config.neumann_terms, seed, weight_name, linear.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        swapped.append(weight_name)
    return swapped


def merge_due(step: int, config: PoetConfig, place: int = 0, count: int = 1) -> bool:
    """Whether the layer at ``place`` among ``count`` POET layers merges after optimizer step ``step`` (0-based)."""
    return config.schedule().is_due(step + 1, place, count) and step + 1 > 0


def generator_params(module: POETLinear) -> tuple[nn.Parameter, nn.Parameter]:
    return module.q_out, module.q_in


@torch.no_grad()
def merge_poet(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    config: PoetConfig | None = None,
) -> list[str]:
    """Merges the POET layers due at ``step`` (the step about to run; all of them when ``config`` is None).

    W0 <- R W0 P, permutations drawn for ``step``, generators zeroed in place, and their state in ``optimizer``
    dropped (torch's AdamW and :class:`lowrank.CompactAdamW` create it afresh at the next step: moments 0, step 0).

    Returns:
        The merged layers' module names.

    Raises:
        PoetMergeError: with ``config``, a due layer's orthogonality error exceeds ``config.max_merge_error``; checked
            for every due layer before any is merged, so the model and the optimizer are left as they were.
    """
    layers = poet_modules(model)
    due = [
        (name, layer)
        for place, (name, layer) in enumerate(layers)
        if config is None or merge_due(step - 1, config, place, len(layers))
    ]
    if config is not None and due:
        errors = {name: float(layer.orthogonality_error()) for name, layer in due}
        worst = max(errors, key=lambda name: errors[name])
        if not errors[worst] <= config.max_merge_error:  # NaN fails too
            q_norm = float(dict(due)[worst].q_norm_max())
            raise PoetMergeError(
                f"POET merge before step {step}: {worst} has orthogonality error {errors[worst]:.3g} "
                f"(max ||Q||_2 = {q_norm:.3g}; the Cayley-Neumann series needs ||Q||_2 < 1), above "
                f"optimizer.poet.max_merge_error = {config.max_merge_error}: folding it into W0 would change the "
                "weight's singular values for good. Nothing was merged. Resume with a lower optimizer.poet.lr or more "
                "frequent merges (optimizer.poet.merge_every; both may change on resume); a new run may also use "
                "smaller blocks (optimizer.poet.block_size); more neumann_terms help only below ||Q||_2 = 1. Accepted "
                "for max_merge_error: a finite number > 0"
            )
    merged = []
    for name, layer in due:
        layer.merge_(step)
        if optimizer is not None:
            for param in generator_params(layer):
                optimizer.state.pop(param, None)
        merged.append(name)
    return merged


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter elements of ``model`` (W0 counts as frozen)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
