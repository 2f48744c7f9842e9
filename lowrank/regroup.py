"""Loading an optimizer state dict saved with another group layout of the same parameters: matched by name.

``torch.optim`` matches a state dict's groups to the optimizer's by position. The layout of
:func:`lowrank.build_optimizer` changed once: parameters without weight decay (1-D ones, and those matching
``optimizer.no_decay``; :mod:`lowrank.decay`) moved from the ``plain`` group (``lowrank`` / ``plain``) into groups of
their own (``lowrank`` / ``plain`` / ``plain_no_decay``). :func:`regroup_by_name` lets such a state dict load:

* groups that agree in number, sizes and ``name`` labels load by position, as ``torch.optim`` does (nothing changes);
* otherwise, when both the state dict and the optimizer name their parameters (``param_names``, which
  ``build_optimizer`` sets and ``torch.optim`` saves), the saved groups are rebuilt in the optimizer's layout: every
  parameter's state follows its name (wrapper prefixes such as ``_orig_mod.`` ignored), every group takes the saved
  hyperparameters of its parameters' former group (lr, betas, the low-rank step counter, the draw seed, ...) except
  the layout's own keys (``name``, ``weight_decay``), which are the optimizer's. One warning says so, including that an
  lr scheduler restored from the same checkpoint still holds one value per *saved* group;
* otherwise one ValueError says what differs (group layouts, names, low-rank or plain).

``LowRankOptimizer`` and ``CompactAdamW`` call it at the start of ``load_state_dict``; ``build_optimizer`` registers
it as a ``load_state_dict`` pre-hook of ``torch.optim.AdamW`` (``register_load_state_dict_pre_hook``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from lowrank.randomness import normalize_param_name

LAYOUT_KEYS: tuple[str, ...] = ("name", "weight_decay")  # set by the layout, not carried over from the state dict
_NOT_HYPER = ("params", "param_names", *LAYOUT_KEYS)


def describe_layout(groups: list[Mapping[str, Any]]) -> str:
    """``lowrank (3), plain (4)``: each group's ``name`` (or index) and size."""
    return ", ".join(f"{g.get('name', f'group{i}')} ({len(g['params'])})" for i, g in enumerate(groups))


def same_layout(saved: list[Mapping[str, Any]], groups: list[Mapping[str, Any]]) -> bool:
    """Same number of groups, same sizes, and the same ``name`` label wherever both have one."""
    return len(saved) == len(groups) and all(
        len(s["params"]) == len(g["params"]) and ("name" not in s or "name" not in g or s["name"] == g["name"])
        for s, g in zip(saved, groups)
    )


def regroup_by_name(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The state dict rebuilt in ``optimizer``'s group layout (module docstring), or None when it already has it.
    Usable as a ``load_state_dict`` pre-hook.

    Raises:
        ValueError: the layouts differ and the parameters cannot be matched by name.
    """
    saved, groups = state_dict["param_groups"], optimizer.param_groups
    if same_layout(saved, groups):
        return None
    layouts = f"the state dict's groups are {describe_layout(saved)}, this optimizer's {describe_layout(groups)}"
    unnamed = [g for g in (*saved, *groups) if len(g.get("param_names", ())) != len(g["params"])]
    if unnamed:
        raise ValueError(
            f"load_state_dict: {layouts}, and the parameters cannot be matched by name (a group without "
            "param_names). Since lowrank-recipes put parameters without weight decay (1-D, or matching "
            "optimizer.no_decay) in groups of their own (plain_no_decay), a state dict of the former layout (lowrank, "
            "plain) loads only with its param_names; build the optimizer with lowrank.build_optimizer, or name the "
            "parameters of each group (param_names)"
        )
    where: dict[str, tuple[Mapping[str, Any], Any]] = {}
    for group in saved:
        for name, key in zip(group["param_names"], group["params"]):
            where[normalize_param_name(name)] = (group, key)
    wanted = [normalize_param_name(name) for group in groups for name in group["param_names"]]
    missing, extra = [n for n in wanted if n not in where], sorted(set(where) - set(wanted))
    if missing or extra:
        raise ValueError(
            f"load_state_dict: {layouts}, and their parameters differ: not in the state dict: {missing or 'none'}; "
            f"only in the state dict: {extra or 'none'}; accepted: a state dict of the same parameters"
        )
    rebuilt = [_rebuild(group, where) for group in groups]
    warnings.warn(
        f"lowrank: {layouts}: the state was matched to the parameters by name. The groups' name and weight_decay "
        "are this optimizer's (parameters without weight decay, 1-D or matching optimizer.no_decay, now sit in "
        "*_no_decay groups: lowrank.decay), the other hyperparameters the state dict's. An lr scheduler restored from "
        "the same checkpoint still holds one entry per saved group (base_lrs): rebuild it for the new groups (the "
        "recipe's module does)",
        stacklevel=3,
    )
    return {**state_dict, "param_groups": rebuilt}


def _rebuild(group: Mapping[str, Any], where: dict[str, tuple[Mapping[str, Any], Any]]) -> dict[str, Any]:
    """The saved group for ``group``: its parameters' saved keys, their former group's hyperparameters."""
    names = [normalize_param_name(name) for name in group["param_names"]]
    sources = list({id(where[n][0]): where[n][0] for n in names}.values())
    if not sources:  # an empty group: nothing saved, its own hyperparameters
        return {k: v for k, v in group.items() if k != "params"} | {"params": []}
    first = sources[0]
    for other in sources[1:]:
        differ = sorted(k for k in {*first, *other} - set(_NOT_HYPER) if not _same(first.get(k), other.get(k)))
        if differ:
            raise ValueError(
                f"load_state_dict: group {group.get('name')!r} takes parameters from saved groups "
                f"{first.get('name')!r} and {other.get('name')!r}, which differ in {differ}; accepted: a state dict "
                "whose parameters of one group share their hyperparameters"
            )
    lowrank = group.get("rank") is not None
    moved = [n for n in names if (where[n][0].get("rank") is not None) != lowrank]
    if moved:
        was, now = ("plain", "low-rank") if lowrank else ("low-rank", "plain")
        raise ValueError(
            f"load_state_dict: parameter(s) {moved} were {was} in the state dict and are {now} in this optimizer "
            "(optimizer.lowrank.targets changed?); accepted: the same low-rank parameters as the checkpoint"
        )
    rebuilt = {k: v for k, v in first.items() if k not in ("params", "param_names")}
    rebuilt.update({k: group[k] for k in LAYOUT_KEYS if k in group})
    rebuilt.update(params=[where[n][1] for n in names], param_names=list(group["param_names"]))
    return rebuilt


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return a is b
