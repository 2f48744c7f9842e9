"""The options of a low-rank parameter group: one dataclass, their defaults, and the one check of their values.

:class:`LowRankOptions` is the single source of the per-group options. The optimizer's group defaults
(``LOWRANK_DEFAULTS``) are derived from it, the config section ``optimizer.lowrank`` (``lowrank.LowRankConfig``)
extends it, and :func:`lowrank_problems` validates both (a config section and an optimizer's groups) the same way.
When the basis refreshes is not a group option: that is the optimizer's :class:`lowrank.RefreshSchedule`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lowrank.checks import check, dotted, is_int, is_number, join_accepted
from lowrank.moments import MOMENT_POLICIES
from lowrank.projector import SIDES
from lowrank.selectors import selector_problems


@dataclasses.dataclass
class LowRankOptions:
    """Options of a low-rank parameter group (any of them may be set per group of a ``LowRankOptimizer``).

    Attributes:
        rank: r, the subspace dimension; None makes a plain group (embeddings, head, norms: full base update).
        alpha: scale of the back-projected update (GaLore's ``scale``): low-rank weights move by lr * alpha.
        selector: subspace rule, a name from ``lowrank.SELECTORS``: dominant (GaLore), importance (SARA, the
            default), random (GoLore), randomized_dominant, randomized_importance.
        selector_options: options of the rules, by rule name, e.g. ``{"randomized_importance": {"oversampling": 8,
            "power_iters": 2}}`` (each rule's dataclass fields; a rule not named keeps its defaults). Keyed by name
            so that the schedule's ``switch_to`` rule can have options too.
        side: projection side: auto (GaLore's rule: right when m >= n), left, right (FSDP2 needs right).
        moment_policy: what the base's moments do when the basis changes: keep (GaLore), rotate, reset.
        fira: add Fira's full-rank residual.
        fira_gamma: Fira's norm-growth limit (> 1).
        seed: run seed of the draws (lowrank.randomness). None: Lightning's global seed when
            ``lightning.seed_everything`` set it (the ``PL_GLOBAL_SEED`` environment variable), else 0; the optimizer
            resolves it when a group is added and keeps the integer in the group (and so in its ``state_dict``).
    """

    rank: int | None = None
    alpha: float = 0.25
    selector: str = "importance"
    selector_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    side: str = "auto"
    moment_policy: str = "keep"
    fira: bool = False
    fira_gamma: float = 1.01
    seed: int | None = None


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LowRankOptions))
LOWRANK_DEFAULTS: dict[str, Any] = dataclasses.asdict(LowRankOptions())
"""The optimizer's defaults of every group option (``rank`` None: a plain group; ``seed`` None: resolved when the
optimizer is built)."""


def lowrank_problems(values: Mapping[str, Any], prefix: str = "", rotatable: bool | None = None) -> list[str]:
    """Every invalid value among the :class:`LowRankOptions` in ``values`` (a group or a config section), each named
    ``prefix.<option>``. ``rank`` None is a plain group and skips the rest. ``rotatable``: whether the base optimizer
    can rotate its moments (None: unknown, not checked)."""
    rank = values.get("rank")
    problems = check(rank is None or is_int(rank, 1), dotted(prefix, "rank"), rank, "an integer >= 1")
    if rank is None:
        return problems
    alpha, gamma, policy = values["alpha"], values["fira_gamma"], values["moment_policy"]
    problems += check(is_number(alpha) and alpha > 0, dotted(prefix, "alpha"), alpha, "a number > 0")
    problems += check(values["side"] in SIDES, dotted(prefix, "side"), values["side"], join_accepted(SIDES))
    problems += check(
        policy in MOMENT_POLICIES, dotted(prefix, "moment_policy"), policy, join_accepted(MOMENT_POLICIES)
    )
    if policy == "rotate" and rotatable is False:
        problems.append(
            f"{dotted(prefix, 'moment_policy')}: 'rotate' needs a base with known moments (adam, adamw); "
            "accepted with this base: keep | reset"
        )
    problems += check(isinstance(values["fira"], bool), dotted(prefix, "fira"), values["fira"], "true | false")
    problems += check(is_number(gamma) and gamma > 1, dotted(prefix, "fira_gamma"), gamma, "a number > 1")
    seed = values["seed"]
    problems += check(seed is None or is_int(seed), dotted(prefix, "seed"), seed, "an integer, or None")
    problems += selector_problems(values["selector"], {}, dotted(prefix, "selector"))
    options = values["selector_options"]
    if not isinstance(options, Mapping):
        return problems + check(False, dotted(prefix, "selector_options"), options, "a mapping: rule name -> options")
    for name, own in options.items():
        problems += selector_problems(name, own, dotted(dotted(prefix, "selector_options"), str(name)))
    return problems
