"""``RefreshSchedule``: when each low-rank parameter's basis is refreshed, and with which selector.

A pure function of the optimizer step ``s`` (0-based: the step about to run) and the parameter's *place*: its index
``i`` among the optimizer's ``n`` low-rank parameters, in group order then ``param_names`` order (for a LLaMA, layer by
layer). With update gap ``T`` and stagger ``k``, parameter ``i`` sits in slice ``j = floor(i * k / n)`` with offset
``o_j = floor(j * T / k)`` and is refreshed at step ``s`` when

    s >= 0  and  (s - o_j) % T == 0          # k = 1: every parameter at steps 0, T, 2T, ...

Staggering spreads the SVD cost of a refresh over the period instead of a spike every T steps; every parameter still
refreshes exactly once per T steps (k > T makes several slices share an offset). On top of the rule, a parameter
without a basis yet is refreshed at the first step it has a gradient (the optimizer adds those), so slice j's first
interval is ``o_j`` steps rather than T.

Selector: each group's own ``selector`` until ``switch_step = ceil(switch_at * max_steps)``, ``switch_to`` from then on
(GoLore: dominant, then random); the switch takes effect at the first refresh at or after ``switch_step``.
``max_steps`` is the run length the fraction refers to: Lightning's ``SubspaceResampler`` (and ``PerLayerUpdates``)
fill it from ``trainer.max_steps``; in a plain loop set it yourself.

How a refresh runs is part of the same object: ``split_across_ranks`` (DDP) makes each rank select a round-robin share
of the due bases and broadcast them (:mod:`lowrank.split_refresh`).

The optimizer owns the schedule (``LowRankOptimizer.schedule``) and applies it on every path: :meth:`step`, the
per-layer step inside backward, and ``resample(step=s)``. Nothing here holds state: a resumed run recomputes the same
due sets from its restored step counter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from lowrank.checks import check, dotted, is_int, is_number, raise_problems
from lowrank.selectors import selector_problems
from lowrank.vocabulary import CONFIG_KEYS, OPTIMIZER_OPTIONS, hint


@dataclasses.dataclass(frozen=True)
class RefreshSchedule:
    """When bases refresh (module docstring). Checked by :meth:`problems` (the optimizer does, when given one).

    Attributes:
        update_gap: T, optimizer steps between two refreshes of a parameter (reference runs: 200; 7B: 500).
        stagger: k, slices of the low-rank parameters refreshed at different steps of a period (1: all at once).
        switch_at: fraction of ``max_steps`` in [0, 1] from which refreshes use ``switch_to``; None: never (GoLore:
            dominant, then random from a fraction on).
        switch_to: the selector from ``switch_at`` on (a name from ``lowrank.SELECTORS``); needs ``switch_at``.
        max_steps: the run length that ``switch_at`` is a fraction of; None until a trainer (or you) sets it, and in
            the recipe's config None means ``trainer.max_steps``.
        split_across_ranks: with several DDP ranks, each rank computes a round-robin share of a refresh's bases and
            broadcasts them (about 1/world of the SVDs per rank, one broadcast per basis). Off: every rank computes
            every basis, no communication. Not for FSDP2 (DTensor) parameters nor per-layer updates.
    """

    MOVED_KEYS: ClassVar[dict[str, str]] = {"update_proj_gap": CONFIG_KEYS["update_proj_gap"]}  # GaLore's word

    update_gap: int = 200
    stagger: int = 1
    switch_at: float | None = None
    switch_to: str | None = None
    max_steps: int | None = None
    split_across_ranks: bool = False

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid value, each named ``prefix.<field>``."""
        at, to = self.switch_at, self.switch_to
        problems = [
            *check(is_int(self.update_gap, 1), dotted(prefix, "update_gap"), self.update_gap, "an integer >= 1"),
            *check(
                is_int(self.stagger, 1), dotted(prefix, "stagger"), self.stagger, "an integer >= 1 (1: no staggering)"
            ),
            *check(
                at is None or (is_number(at) and 0 <= at <= 1),
                dotted(prefix, "switch_at"),
                at,
                "a fraction of max_steps in [0, 1], or None (never switch)",
            ),
            *check(
                self.max_steps is None or is_int(self.max_steps, 1),
                dotted(prefix, "max_steps"),
                self.max_steps,
                "an integer >= 1, or None",
            ),
            *check(
                isinstance(self.split_across_ranks, bool),
                dotted(prefix, "split_across_ranks"),
                self.split_across_ranks,
                "true | false",
            ),
        ]
        if to is not None:
            problems += selector_problems(to, {}, dotted(prefix, "switch_to"))
        if (at is None) != (to is None):
            problems.append(
                f"{dotted(prefix, 'switch_at')} and {dotted(prefix, 'switch_to')} go together: give both "
                "(e.g. switch_at 0.5, switch_to random) or neither"
            )
        return problems

    def offset(self, place: int, count: int) -> int:
        """o_j of the parameter at ``place`` among ``count`` low-rank parameters."""
        return (place * self.stagger // count) * self.update_gap // self.stagger

    def is_due(self, step: int, place: int, count: int) -> bool:
        """Whether the rule refreshes the parameter at ``place`` at ``step`` (a missing basis is the caller's)."""
        return step >= 0 and (step - self.offset(place, count)) % self.update_gap == 0

    def due_places(self, step: int, count: int) -> list[int]:
        """Places (0 .. count - 1) the rule refreshes at ``step``, in order."""
        return [place for place in range(count) if self.is_due(step, place, count)]

    @property
    def switch_step(self) -> int | None:
        """``ceil(switch_at * max_steps)``; None without a switch. Raises when the switch has no ``max_steps``."""
        if self.switch_at is None:
            return None
        if self.max_steps is None:
            raise ValueError(
                f"RefreshSchedule(switch_at={self.switch_at}) is a fraction of max_steps, which is not set: "
                "Lightning's SubspaceResampler sets it from trainer.max_steps; in a plain loop pass "
                "RefreshSchedule(max_steps=...)"
            )
        return math.ceil(self.switch_at * self.max_steps)

    def selector_at(self, step: int, default: str) -> str:
        """The rule of a refresh at ``step``: ``switch_to`` from :attr:`switch_step` on, else ``default`` (the
        group's)."""
        switch = self.switch_step
        return self.switch_to if switch is not None and step >= switch else default

    def with_max_steps(self, max_steps: int | None) -> RefreshSchedule:
        """This schedule with ``max_steps`` filled in when it is unset (an explicit value wins)."""
        return self if self.max_steps is not None else dataclasses.replace(self, max_steps=max_steps)


def as_schedule(value: RefreshSchedule | Mapping[str, Any] | None) -> RefreshSchedule:
    """A checked :class:`RefreshSchedule` from itself, a mapping of its fields, or None (the defaults); one
    ValueError names every problem."""
    if value is None:
        return RefreshSchedule()
    if isinstance(value, Mapping):
        fields = [f.name for f in dataclasses.fields(RefreshSchedule)]
        unknown = sorted(str(k) for k in value if k not in fields)
        hints = "".join(hint(OPTIMIZER_OPTIONS, k) for k in unknown)
        problems = [f"unknown key(s) {unknown}; accepted: {', '.join(fields)}{hints}"] if unknown else []
        raise_problems("schedule", problems)
        value = RefreshSchedule(**value)
    if not isinstance(value, RefreshSchedule):
        raise ValueError(
            f"schedule: invalid value {value!r}; accepted: a RefreshSchedule, a mapping of its fields, or None"
        )
    raise_problems("schedule", value.problems())
    return value
