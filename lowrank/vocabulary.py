"""GaLore's (and GoLore's, SARA's, Fira's) words for this project's options and rules, so that an error about one of
them says what it is called here instead of only "unknown".

One table per kind of word, each used where that kind is reported:

* config keys (:data:`CONFIG_KEYS`): the ``MOVED_KEYS`` of ``OptimizerConfig``, ``LowRankConfig`` and
  ``RefreshSchedule`` (``lowrank.structured`` names the new place of a key listed there);
* the optimizer's keyword arguments and group options (:data:`OPTIMIZER_OPTIONS`): ``LowRankOptimizer``;
* selector names (:data:`SELECTOR_NAMES`): every check of ``selector``, ``switch_to``, ``resample(selector=...)``;
* method names given as the optimizer's name (:data:`METHOD_NAMES`): ``optimizer.name``.

Names are matched case-insensitively, ``-`` read as ``_`` (``GaLore``, ``galore-adamw``).
"""

from __future__ import annotations

from typing import Any

_SIDE = "GaLore's proj_type std is side auto (right when m >= n), left and right are the same; reverse_std, full: none"

CONFIG_KEYS: dict[str, str] = {
    "scale": "optimizer.lowrank.alpha (GaLore's scale: low-rank weights move by lr * alpha)",
    "galore_scale": "optimizer.lowrank.alpha (GaLore's scale: low-rank weights move by lr * alpha)",
    "update_proj_gap": "optimizer.refresh.update_gap (GaLore's update_proj_gap: steps between two refreshes)",
    "proj_type": f"optimizer.lowrank.side ({_SIDE})",
}
"""GaLore's config keys (its ``galore_*`` command-line flags and param-group keys) -> this project's key."""

OPTIMIZER_OPTIONS: dict[str, str] = {
    "scale": "GaLore's name for alpha: LowRankOptimizer(..., alpha=...) or a group's 'alpha'",
    "galore_scale": "GaLore's name for alpha: LowRankOptimizer(..., alpha=...) or a group's 'alpha'",
    "update_proj_gap": "GaLore's name for the refresh gap: LowRankOptimizer(..., schedule=RefreshSchedule("
    "update_gap=...)), one schedule for the optimizer",
    "proj_type": f"GaLore's name for side: LowRankOptimizer(..., side=...) or a group's 'side' ({_SIDE})",
}
"""GaLore's param-group keys -> what to pass to ``LowRankOptimizer`` instead."""

_GOLORE = (
    "random here (GoLore's random subspace; GoLore's schedule, dominant then random, is selector dominant with "
    "optimizer.refresh.switch_at 0.5 and switch_to random)"
)
SELECTOR_NAMES: dict[str, str] = {
    "galore": "dominant here (GaLore's subspace: the top-r singular vectors)",
    "sara": "importance here (SARA's subspace: singular vectors sampled with probability proportional to sigma)",
    "golore": _GOLORE,
    "fira": "not a selector here: Fira is optimizer.lowrank.fira: true (its full-rank residual, with any selector; "
    "Fira's runs used dominant)",
}
"""Method names given as a selector -> the selector (or option) that is that method here."""

_LOWRANK = "name: lowrank here, with "
METHOD_NAMES: dict[str, str] = {
    "galore": _LOWRANK + "optimizer.lowrank.selector: dominant",
    "galore_adamw": _LOWRANK + "optimizer.lowrank.selector: dominant",
    "galore_adamw8bit": _LOWRANK + "optimizer.lowrank.selector: dominant and optimizer.state_precision: 8bit",
    "galore_adafactor": _LOWRANK + "optimizer.lowrank.selector: dominant and optimizer.lowrank.base: adafactor",
    "sara": _LOWRANK + "optimizer.lowrank.selector: importance",
    "golore": _LOWRANK + "optimizer.lowrank.selector: random (or GoLore's schedule: selector dominant, "
    "optimizer.refresh.switch_at 0.5, switch_to random)",
    "fira": _LOWRANK + "optimizer.lowrank.fira: true (and selector dominant, as in Fira's runs)",
    "adamw8bit": "name: adamw here, with optimizer.state_precision: 8bit",
}
"""Method names given as ``optimizer.name`` -> the config that is that method here."""


def _key(word: Any) -> str:
    return str(word).lower().replace("-", "_")


def hint(table: dict[str, str], word: Any) -> str:
    """``"; '<word>' is <table entry>"`` for a word of ``table``, else ``""``: appended to the problem that reports
    ``word`` as invalid or unknown."""
    entry = table.get(_key(word)) if isinstance(word, str) else None
    return f"; {word!r} is {entry}" if entry else ""
