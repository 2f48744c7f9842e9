"""Which parameters train: ``model.trainable`` entries, presets, and freezing the rest.

    trainable(p) = p.requires_grad before  and  (selection is None  or  some entry selects name(p))

An entry is a preset name (:data:`TRAINABLE_PRESETS`) or a regular expression searched (``re.search``) in the
parameter names (``layers.3.self_attn.o_proj.weight``). Presets:

* ``all``: every parameter (the same as no selection);
* ``companions``: what every preset of a module type adds: every parameter of an ``nn.Embedding``, every parameter
  with fewer than two dimensions (norm scales, biases) and the output head (a parameter of a module named
  ``lm_head``, or of a top-level ``head`` / ``output``, also under a ``model.`` prefix);
* ``sfn_oproj``: the attention output projections (``o_proj``) plus ``companions``: the "train only o_proj" setting
  of SfN ("Who Reasons in the Large Language Models?"), which matched full fine-tuning at about 3x the speed;
* ``attention``: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` plus ``companions``;
* ``mlp``: ``gate_proj``, ``up_proj``, ``down_proj`` plus ``companions``.

Every other parameter gets ``requires_grad = False``: no gradient, and an optimizer built afterwards
(:func:`lowrank.build_optimizer`) holds no state for it. A parameter that was already frozen (POET's W0) stays
frozen: the selection only ever freezes. Each regular expression, and the module-type part of each preset, must
select at least one parameter (the target-pattern rule, :func:`lowrank.targets.match_targets`): a typo would silently
freeze what was meant to train. Under POET
(:func:`lowrank.poet.apply_poet` first) the entries select the generators by their layer's name
(``o_proj`` selects ``layers.3.self_attn.o_proj.q_out`` and ``.q_in``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from torch import nn

from lowrank.targets import match_targets

KEY = "model.trainable"
_COMPANIONS = "companions"
_HEAD = re.compile(r"(^|\.)lm_head\.|^(model\.)?(head|output)\.")
TRAINABLE_PRESETS: dict[str, tuple[str, ...]] = {
    "all": (r".",),
    _COMPANIONS: (),
    "sfn_oproj": (r"\bo_proj\b",),
    "attention": (r"\bq_proj\b", r"\bk_proj\b", r"\bv_proj\b", r"\bo_proj\b"),
    "mlp": (r"\bgate_proj\b", r"\bup_proj\b", r"\bdown_proj\b"),
}
_WITH_COMPANIONS = ("companions", "sfn_oproj", "attention", "mlp")


@dataclasses.dataclass(frozen=True)
class TrainableSelection:
    """The outcome of :func:`select_trainable`: parameter names in the model's order."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]


def trainable_problems(entries: Sequence[str] | None, key: str = KEY) -> list[str]:
    """What is wrong with ``entries`` before any model exists: not a non-empty list of non-empty strings. (Whether
    each is a regular expression that selects something is :func:`select_trainable`'s check, on the model.)"""
    if entries is None:
        return []
    ok = not isinstance(entries, str) and isinstance(entries, Sequence) and bool(entries)
    if ok and all(isinstance(entry, str) and entry for entry in entries):
        return []
    return [
        f"{key}: invalid value {entries!r}; accepted: null (everything trains) or a non-empty list of preset names "
        f"({' | '.join(TRAINABLE_PRESETS)}) and regular expressions"
    ]


def is_companion(name: str, module: nn.Module, param: nn.Parameter) -> bool:
    """Whether ``param`` (named ``name``, owned by ``module``) is a companion: embedding, 0/1-D (norm, bias), head."""
    return isinstance(module, nn.Embedding) or param.dim() < 2 or bool(_HEAD.search(name))


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """parameter name -> the module that owns it directly."""
    return {
        f"{prefix}.{leaf}" if prefix else leaf: module
        for prefix, module in model.named_modules()
        for leaf, _ in module.named_parameters(recurse=False)
    }


def select_trainable(model: nn.Module, entries: Sequence[str] | None) -> TrainableSelection:
    """Freezes (``requires_grad = False``) every parameter of ``model`` no entry selects (module docstring).

    Args:
        model: any module; its parameters are changed in place (no copies: wrappers and optimizers built later see
            the same objects).
        entries: preset names and regular expressions; None selects everything (nothing changes).

    Returns:
        The trainable and frozen parameter names (frozen includes parameters that were frozen before).

    Raises:
        ValueError: an entry is invalid, or a regular expression (or a preset's module types) selects no parameter;
            the message names ``model.trainable`` and shows parameter names. Nothing is frozen then.
    """
    problems = trainable_problems(entries)
    if problems:
        raise ValueError("; ".join(problems))
    named = list(model.named_parameters())
    if entries is None:
        return TrainableSelection(
            tuple(n for n, p in named if p.requires_grad), tuple(n for n, p in named if not p.requires_grad)
        )
    owners = _owners(model)
    # presets may share module types (sfn_oproj, attention): each pattern once
    patterns = list(dict.fromkeys(p for entry in entries for p in TRAINABLE_PRESETS.get(entry, (entry,))))
    sample = ", ".join(name for name, _ in named[:6])
    selected = set(
        match_targets(
            [name for name, _ in named],
            patterns,
            f"parameter; parameter names look like: {sample}, ...; accepted: preset names "
            f"({' | '.join(TRAINABLE_PRESETS)}) and regular expressions that match at least one parameter name",
            key=KEY,
        )
    )
    if any(entry in _WITH_COMPANIONS for entry in entries):
        selected |= {name for name, param in named if is_companion(name, owners[name], param)}
    for name, param in named:
        if name not in selected:
            param.requires_grad_(False)
    return TrainableSelection(
        tuple(n for n, p in named if p.requires_grad), tuple(n for n, p in named if not p.requires_grad)
    )
