"""What :meth:`LowRankOptimizer.resample` reports for each refreshed parameter, so monitors need no internals."""

from __future__ import annotations

import dataclasses
import functools

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
        old_basis: (d, r) basis before the refresh, ``None`` at the first refresh.
        new_basis: (d, r) basis after it.
    """

    name: str
    step: int
    selector: str
    side: str
    old_basis: torch.Tensor | None
    new_basis: torch.Tensor

    @property
    def rank(self) -> int:
        return self.new_basis.shape[1]

    @property
    def dim(self) -> int:
        return self.new_basis.shape[0]

    @functools.cached_property
    def overlap(self) -> float | None:
        """||B_old^T B_new||_F^2 / r in [0, 1]; ``None`` at the first refresh."""
        return None if self.old_basis is None else subspace_overlap(self.old_basis, self.new_basis)

    @property
    def chance(self) -> float:
        """r / d: the expected overlap of two independent random subspaces of this size."""
        return chance_overlap(self.rank, self.dim)
