"""``build_optimizer(model, config)``: which parameters go low-rank, which decay, the optimizer, and the group table.

Rule: a parameter goes low-rank when it is 2-D and its name matches one of ``config.lowrank.targets`` (regular
expressions, ``re.search``, first match wins; default: the q, k, v, o, gate, up and down projections). Everything
else (embeddings, output head, norms, biases) is plain: the base optimizer at the full learning rate. A parameter
decays when it has two or more dimensions and matches no ``config.no_decay`` pattern (:mod:`lowrank.decay`).

Groups, in this order, each present when it has a parameter (``name`` labels them, e.g. in Lightning's
LearningRateMonitor: ``train/lr/lowrank``, ``train/lr/plain``, ``train/lr/plain_no_decay``):

* ``lowrank``: the low-rank weights (``rank`` set), with ``weight_decay``;
* ``lowrank_no_decay``: low-rank weights a ``no_decay`` pattern names, weight decay 0;
* ``plain``: the other parameters with two or more dimensions (embeddings, head), with ``weight_decay``;
* ``plain_no_decay``: norms, biases and what a ``no_decay`` pattern names, weight decay 0.

``name: adamw`` has the last two, and with ``target_lr_scale`` != 1 two more before them: ``targets`` and
``targets_no_decay``, the weights ``lowrank.targets`` names, at ``lr * target_lr_scale`` (the low-rank runs' two-rate
treatment without the subspace). A state dict saved with the former layout (``lowrank``, ``plain``: norms decayed
with the rest) still loads, matched by parameter name (:mod:`lowrank.regroup`).

Frozen parameters (``requires_grad = False``: :func:`lowrank.trainable.select_trainable`, POET's W0) are not the
optimizer's: no group, no state. The target patterns are matched among every 2-D weight, frozen ones included, and
the trainable matches go low-rank: a pattern that matches only frozen weights is not an error, the group table lists
it (``frozen_targets``) and counts the frozen elements; a pattern that matches nothing at all is.

``name: poet`` (after :func:`lowrank.poet.apply_poet`): a first group ``poet`` holds the POET layers' generators
(``q_out``, ``q_in``) at ``poet.lr`` without weight decay; the other trainable parameters follow in ``plain`` and
``plain_no_decay`` at ``lr``; the frozen W0 hold no state and are counted as frozen in the group table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowrank.bases import BASES
from lowrank.compact_adamw import CompactAdamW
from lowrank.companions import companions_of
from lowrank.config import PRECISION_BASES, OptimizerConfig, optimizer_config_from_dict
from lowrank.decay import NO_DECAY_SUFFIX, decays, unmatched
from lowrank.names import module_types
from lowrank.optimizer import LowRankOptimizer
from lowrank.poet import poet_modules
from lowrank.projector import basis_dim, projected_shape, resolve_side
from lowrank.randomness import resolve_seed
from lowrank.regroup import regroup_by_name
from lowrank.table import GroupTable, TableRow
from lowrank.targets import match_targets

__all__ = ["GROUP_NAMES", "GroupTable", "TableRow", "build_optimizer", "lowrank_plan"]

GROUP_NAMES: tuple[str, ...] = tuple(
    kind + suffix for kind in ("lowrank", "targets", "plain") for suffix in ("", NO_DECAY_SUFFIX)
)


def _base_options(cfg: OptimizerConfig, base: str) -> dict[str, Any]:
    if base in ("adam", "adamw", "adamw_bf16", "adamw8bit"):
        return {"betas": tuple(cfg.betas), "eps": cfg.eps}
    return {}  # Adafactor keeps its own defaults (no first moment; relative steps)


def _assign(
    named: list[tuple[str, nn.Parameter]], targets: list[str], frozen: list[tuple[str, nn.Parameter]] = ()
) -> dict[str, str]:
    """name -> matching pattern for every trainable 2-D parameter that matches a target (first match wins). The
    patterns are matched among the trainable and the ``frozen`` 2-D parameters: a pattern that matches only frozen
    ones (``model.trainable`` left them out) is fine; one that matches nothing at all is an error."""
    candidates = [*named, *frozen]
    sample = ", ".join(name for name, _ in candidates[:6])
    chosen = match_targets(
        [name for name, param in candidates if param.dim() == 2],
        targets,
        f"2-D parameter; parameter names look like: {sample}, ...; accepted: regular expressions that match at least "
        "one 2-D weight",
    )
    trainable = {name for name, _ in named}
    return {name: pattern for name, pattern in chosen.items() if name in trainable}


def _frozen(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """The parameters the optimizer does not take (requires_grad False and no projected-gradient companion)."""
    taken = {name for name, _ in named}
    skip = {id(companion) for _, companion in companions_of(model).values()}
    return [(n, p) for n, p in model.named_parameters() if n not in taken and id(p) not in skip]


def _frozen_targets(
    named: list[tuple[str, nn.Parameter]], frozen: list[tuple[str, nn.Parameter]], targets: list[str]
) -> tuple[str, ...]:
    """The target patterns whose first-match parameters are all frozen (listed as such in the group table)."""
    if not frozen:
        return ()
    candidates = [name for name, param in [*named, *frozen] if param.dim() == 2]
    chosen = match_targets(candidates, targets, "2-D parameter")
    trainable = {name for name, _ in named}
    by_pattern: dict[str, list[str]] = {}
    for name, pattern in chosen.items():
        by_pattern.setdefault(pattern, []).append(name)
    return tuple(p for p in targets if p in by_pattern and not trainable.intersection(by_pattern[p]))


def _table(
    rows: tuple[TableRow, ...],
    frozen: list[tuple[str, nn.Parameter]],
    frozen_targets: tuple[str, ...] = (),
    seed: int | None = None,
    seed_source: str | None = None,
) -> GroupTable:
    return GroupTable(
        rows, seed, seed_source, frozen=tuple((n, tuple(p.shape)) for n, p in frozen), frozen_targets=frozen_targets
    )


def _decay(named: list[tuple[str, nn.Parameter]], cfg: OptimizerConfig, everything: list[str]) -> dict[str, bool]:
    """name -> whether it decays; a ``no_decay`` pattern that matches no parameter of the model (``everything``,
    frozen ones included) is an error."""
    unused = unmatched(cfg.no_decay, everything)
    if unused:
        sample = ", ".join(name for name, _ in named[:6])
        raise ValueError(
            f"optimizer.no_decay: pattern(s) {unused} match no parameter; parameter names look like: {sample}, ...; "
            "accepted: regular expressions that match at least one parameter name"
        )
    return {name: decays(name, param, cfg.no_decay) for name, param in named}


def _groups(
    named: list[tuple[str, nn.Parameter]],
    lowrank: set[str],
    decay: dict[str, bool],
    cfg: OptimizerConfig,
    targets: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """The optimizer's groups (module docstring), in ``GROUP_NAMES`` order, empty ones left out; ``targets``: the
    full-rank weights at ``lr * target_lr_scale``."""
    members: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in GROUP_NAMES}
    for name, param in named:
        kind = "lowrank" if name in lowrank else "targets" if name in targets else "plain"
        members[kind if decay[name] else kind + NO_DECAY_SUFFIX].append((name, param))
    groups = []
    for group_name, params in members.items():
        if not params:
            continue
        group = {
            "params": [p for _, p in params],
            "param_names": [n for n, _ in params],
            "name": group_name,
            "weight_decay": 0.0 if group_name.endswith(NO_DECAY_SUFFIX) else cfg.weight_decay,
        }
        if group_name.startswith("lowrank"):
            group["rank"] = cfg.lowrank.rank
        if group_name.startswith("targets"):
            group["lr"] = cfg.lr * cfg.target_lr_scale
        groups.append(group)
    return groups


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters an optimizer takes: those that require grad, plus the weights with projected gradients (which
    do not under DDP: lowrank.projected), without their companions (stepped through the weights)."""
    companions = companions_of(model)
    skip = {id(companion) for _, companion in companions.values()}
    return [
        (name, p)
        for name, p in model.named_parameters()
        if (p.requires_grad or name in companions) and id(p) not in skip
    ]


def _check_ranks(named: list[tuple[str, nn.Parameter]], chosen: dict[str, str], rank: int) -> None:
    for name, param in named:
        if name in chosen and rank > min(param.shape):
            raise ValueError(
                f"optimizer.lowrank.rank: {rank} is larger than parameter {name!r} allows (shape "
                f"{tuple(param.shape)}); accepted: 1 .. {min(param.shape)}, or exclude it from "
                "optimizer.lowrank.targets"
            )


def lowrank_plan(
    model: nn.Module, config: OptimizerConfig | Mapping[str, Any]
) -> list[tuple[str, nn.Parameter, int, str]]:
    """(name, parameter, rank, side) of every parameter :func:`build_optimizer` puts low-rank under ``config``, known
    before the optimizer exists (projected gradients register their companions from it); empty for ``adamw``."""
    cfg = optimizer_config_from_dict(config)
    if cfg.name != "lowrank":
        return []
    named = _trainable(model)
    chosen = _assign(named, cfg.lowrank.targets, _frozen(model, named))
    _check_ranks(named, chosen, cfg.lowrank.rank)
    low = cfg.lowrank
    return [(n, p, low.rank, resolve_side(tuple(p.shape), low.side)) for n, p in named if n in chosen]


def _adamw(groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """torch's AdamW (fp32 states) or :class:`CompactAdamW` (bf16 / 8-bit states) over ``groups``."""
    hyper = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.state_precision == "fp32":
        optimizer = torch.optim.AdamW(groups, **hyper)
        optimizer.register_load_state_dict_pre_hook(regroup_by_name)  # CompactAdamW regroups by itself
        return optimizer
    return CompactAdamW(groups, state_precision=cfg.state_precision, **hyper)


def _poet_optimizer(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], decay: dict[str, bool], cfg: OptimizerConfig
) -> torch.optim.Optimizer:
    """AdamW with the POET generators in a ``poet`` group (lr ``poet.lr``, no weight decay) before the usual ones."""
    layers = poet_modules(model)
    if not layers:
        raise ValueError(
            "optimizer.name: poet, but the model holds no POETLinear layer; accepted: a model transformed by "
            "lowrank.apply_poet(model, config.poet, config.lowrank.targets, seed) first (the recipe does it), or "
            "optimizer.name adamw | lowrank"
        )
    generators = {f"{name}.{suffix}" for name, _ in layers for suffix in ("q_out", "q_in")}
    poet = [(n, p) for n, p in named if n in generators]
    rest = [(n, p) for n, p in named if n not in generators]
    groups = [
        {
            "params": [p for _, p in poet],
            "param_names": [n for n, _ in poet],
            "name": "poet",
            "lr": cfg.poet.lr,
            "weight_decay": 0.0,
        },
        *_groups(rest, set(), decay, cfg),
    ]
    optimizer = _adamw(groups, cfg)
    rows = _adamw_rows(named, groups, cfg, module_types([n for n, _ in poet]))
    optimizer.group_table = _table(rows, _frozen(model, named))
    return optimizer


def _adamw_rows(
    named: list[tuple[str, nn.Parameter]], groups: list[dict[str, Any]], cfg: OptimizerConfig, types: dict[str, str]
) -> tuple[TableRow, ...]:
    """Group-table rows of an AdamW over ``groups`` (no rank, side or pattern); ``types``: module types to show."""
    spec, owner = BASES[PRECISION_BASES.get(cfg.state_precision, "adamw")], _group_of(groups)
    return tuple(
        TableRow(
            n,
            tuple(p.shape),
            owner[n]["name"],
            None,
            None,
            None,
            spec.estimate_state_bytes(tuple(p.shape), p.dtype),
            owner[n]["weight_decay"],
            types.get(n),
        )
        for n, p in named
    )


def _group_of(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: group for group in groups for name in group["param_names"]}


def build_optimizer(model: nn.Module, config: OptimizerConfig | Mapping[str, Any]) -> torch.optim.Optimizer:
    """Builds the configured optimizer over ``model``'s trainable parameters, in the groups of the module docstring.

    Returns:
        The optimizer (``torch.optim.AdamW`` for ``name: adamw`` (or :class:`CompactAdamW` with compact states),
        else :class:`LowRankOptimizer` on the ``optimizer.refresh`` schedule), ready to be returned from a
        LightningModule's ``configure_optimizers``. Its ``group_table`` attribute (:class:`GroupTable`) says which
        parameter went where, which decay, and the draw seed, to log at start-up.
    """
    cfg = optimizer_config_from_dict(config)
    named = _trainable(model)
    companions = companions_of(model)
    projected = [name for name, _ in named if name in companions]
    if not named:
        raise ValueError("model has no trainable parameters")
    decay = _decay(named, cfg, [name for name, _ in model.named_parameters()])
    if cfg.name == "adamw" and projected:
        raise ValueError(
            f"optimizer.name: adamw, but {projected[0]!r} and {len(projected) - 1} more weights have "
            "projected-gradient companions (lowrank.projected); accepted with projected gradients: lowrank"
        )
    if cfg.name == "poet":
        return _poet_optimizer(model, named, decay, cfg)
    if cfg.name == "adamw":
        # fp32: torch's own AdamW, the reference baseline; bf16 / 8bit: the same update with compact moments.
        # target_lr_scale: the weights lowrank.targets names step at lr * scale (every pattern must match, as for
        # low-rank runs: a typo would silently give one learning rate)
        frozen = _frozen(model, named)
        scaled = cfg.target_lr_scale != 1.0
        targets = frozenset(_assign(named, cfg.lowrank.targets, frozen)) if scaled else frozenset()
        groups = _groups(named, set(), decay, cfg, targets)
        optimizer = _adamw(groups, cfg)
        frozen_targets = _frozen_targets(named, frozen, cfg.lowrank.targets) if scaled else ()
        optimizer.group_table = _table(_adamw_rows(named, groups, cfg, {}), frozen, frozen_targets)
        return optimizer

    low = cfg.lowrank
    frozen = _frozen(model, named)
    chosen = _assign(named, low.targets, frozen)
    _check_ranks(named, chosen, low.rank)
    stray = [name for name in projected if name not in chosen]
    if stray:
        raise ValueError(
            f"{stray}: projected-gradient companions on weights that optimizer.lowrank.targets does not make low-rank; "
            "accepted: companions only on low-rank weights (register them from the same optimizer config)"
        )
    base = cfg.base_name()
    spec = BASES[base]
    seed = resolve_seed(low.seed)
    groups = _groups(named, set(chosen), decay, cfg)
    owner, types = _group_of(groups), module_types(chosen)
    rows = []
    for name, param in named:
        shape, group = tuple(param.shape), owner[name]
        if name in chosen:
            side = resolve_side(shape, low.side)
            moments = spec.estimate_state_bytes(projected_shape(shape, side, low.rank), param.dtype)
            basis = basis_dim(shape, side) * low.rank * param.element_size()
            state, where = moments + basis, (low.rank, side, chosen[name])
        else:
            state, where = spec.estimate_state_bytes(shape, param.dtype), (None, None, None)
        rows.append(TableRow(name, shape, group["name"], *where, state, group["weight_decay"], types.get(name)))
    optimizer = LowRankOptimizer(
        groups,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        base=base,
        base_options=_base_options(cfg, base),
        schedule=cfg.refresh,
        **{**low.options(), "seed": seed.value},
    )
    frozen_targets = _frozen_targets(named, frozen, low.targets)
    optimizer.group_table = _table(tuple(rows), frozen, frozen_targets, seed.value, seed.source)
    for name, param in named:  # companions registered before the optimizer (lowrank.projected.add_companions)
        if name in companions:
            optimizer.attach_companion(param, companions[name][1])
    return optimizer
