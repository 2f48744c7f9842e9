"""Shared fixtures: a selector that returns a basis fixed by the test (registered for the test's duration); no
Lightning global seed left over from another test (``PL_GLOBAL_SEED`` seeds the draws of an optimizer without an
explicit seed)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from lowrank.selectors import SELECTORS, SubspaceSelector


@dataclasses.dataclass(frozen=True)
class FixedSelector(SubspaceSelector):
    """Returns ``FixedSelector.bases[d]`` (or the identity's first r columns) for an oriented gradient (d, k)."""

    name: ClassVar[str] = "test_fixed"
    bases: ClassVar[dict[int, torch.Tensor]] = {}

    def _basis(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        d = grad.shape[0]
        basis = self.bases.get(d)
        return torch.eye(d, rank, dtype=grad.dtype) if basis is None else basis[:, :rank].clone()


@pytest.fixture(autouse=True)
def _no_lightning_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # recorded, so that teardown removes what the test set
    monkeypatch.delenv("PL_GLOBAL_SEED")


@pytest.fixture
def fixed_selector(monkeypatch: pytest.MonkeyPatch) -> type[FixedSelector]:
    monkeypatch.setitem(SELECTORS, FixedSelector.name, FixedSelector)
    FixedSelector.bases.clear()
    yield FixedSelector
    FixedSelector.bases.clear()
