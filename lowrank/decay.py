"""Which parameters get weight decay: the rule, and the check of its option ``no_decay``.

Rule (the common convention: nanoGPT, Hugging Face's trainers): a parameter decays when it has at least two
dimensions and its name matches none of the ``no_decay`` patterns (regular expressions, ``re.search`` on the name as
the model gives it). So norm weights and biases (1-D) never decay, and embeddings and the output head (2-D) decay like
every other matrix unless a pattern names them.

:func:`lowrank.build_optimizer` puts the parameters that do not decay in groups of their own with weight decay 0
(``plain_no_decay``, and ``lowrank_no_decay`` when a pattern names a low-rank weight): weight decay stays a group
hyperparameter, as everywhere in ``torch.optim``. With ``weight_decay`` 0 (every shipped config) nothing decays either
way and the updates are those of the former single plain group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

NO_DECAY_SUFFIX = "_no_decay"  # group name of the parameters without weight decay: plain_no_decay, lowrank_no_decay


def no_decay_problems(patterns: Any, key: str) -> list[str]:
    """Every problem with the ``no_decay`` option ``patterns`` (a list of regular expressions), named ``key[i]``."""
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence):
        return [f"{key}: invalid value {patterns!r}; accepted: a list of regular expressions (re.search on names)"]
    problems = []
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            problems.append(f"{key}[{index}]: invalid value {pattern!r}; accepted: a regular expression (a string)")
            continue
        try:
            re.compile(pattern)
        except re.error as err:
            problems.append(f"{key}[{index}]: {pattern!r} is not a regular expression ({err})")
    return problems


def decays(name: str, param: torch.Tensor, no_decay: Sequence[str]) -> bool:
    """Whether ``param`` gets weight decay: two or more dimensions, and no ``no_decay`` pattern found in ``name``."""
    return param.dim() >= 2 and not any(re.search(pattern, name) for pattern in no_decay)


def unmatched(no_decay: Sequence[str], names: Iterable[str]) -> list[str]:
    """The patterns that match none of ``names`` (each one is a mistake: it exempts nothing)."""
    names = list(names)
    return [pattern for pattern in no_decay if not any(re.search(pattern, name) for name in names)]
