"""What :meth:`LowRankOptimizer.resample` reports for each refreshed parameter, so monitors need no internals."""

from __future__ import annotations

import dataclasses

import torch

from lowrank.projector import chance_overlap, subspace_overlap


@dataclasses.dataclass(frozen=True)
class RefreshRecord:
    """One basis refresh.

    Attributes:
        name: the parameter's name (as given to the optimizer, wrapper prefixes included).
        step: optimizer step of the refresh (seeds the draw).
        selector: name of the rule that drew the new basis.
        side: ``left`` or ``right``.
        old_basis: (d, r) basis before the refresh, ``None`` at the first refresh (and in slimmed copies).
        new_basis: (d, r) basis after it (the optimizer's own state tensor, not a copy).
        overlap: ||B_old^T B_new||_F^2 / r in [0, 1], computed from the bases when not given; ``None`` at the first
            refresh. It survives ``dataclasses.replace(record, old_basis=None)``, which frees the old basis.
    """

    name: str
    step: int
    selector: str
    side: str
    old_basis: torch.Tensor | None
    new_basis: torch.Tensor
    overlap: float | None = None

    def __post_init__(self) -> None:
        if self.overlap is None and self.old_basis is not None:
            object.__setattr__(self, "overlap", subspace_overlap(self.old_basis, self.new_basis))

    @property
    def rank(self) -> int:
        return self.new_basis.shape[1]

    @property
    def dim(self) -> int:
        return self.new_basis.shape[0]

    @property
    def chance(self) -> float:
        """r / d: the expected overlap of two independent random subspaces of this size."""
        return chance_overlap(self.rank, self.dim)
