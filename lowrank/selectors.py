"""Subspace selectors: which r-dimensional subspace a low-rank parameter's gradient is projected on.

The contract (one small interface, one class per rule, a name -> class registry ``SELECTORS``):

    basis = selector.select(grad, rank, generator)

* ``grad`` (d, k) is the gradient *oriented by the projector*: G for a left projection, G^T for a right one, so
  the basis always spans part of ``grad``'s column space.
* The result is ``None`` when the gradient cannot define a subspace (all zero or non-finite): "no refresh", the
  caller keeps its old basis. Otherwise a (d, rank) matrix with orthonormal columns, float32 or wider.
* ``generator`` is a CPU generator built by the caller from the project's randomness rule
  (:mod:`lowrank.randomness`); selectors never touch the global RNG and hold no schedule or state.

Rules:

* ``dominant`` (GaLore): the top-r left singular vectors, exact fp32 SVD.
* ``importance`` (SARA): r singular vectors drawn without replacement with probability proportional to the
  singular values (:func:`lowrank.sampling.importance_indices`), sorted.
* ``random`` (GoLore): a uniformly (Haar) distributed orthonormal basis: QR of a Gaussian (d, r) matrix with the
  signs of R's diagonal folded into Q; the gradient only supplies d.
* ``randomized_dominant``: approximation of ``dominant`` by a seeded randomized SVD with k = r + oversampling.
* ``randomized_importance``: approximation of ``importance``: samples r of the top k = r + oversampling singular
  directions found by the randomized SVD (the tail beyond k is never drawn: that is its drift from the exact rule).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from lowrank.checks import check, dotted, is_int, join_accepted, problem
from lowrank.sampling import importance_indices
from lowrank.svd import randomized_svd, thin_svd
from lowrank.vocabulary import SELECTOR_NAMES, hint


def is_refreshable(grad: torch.Tensor) -> bool:
    """False for an all-zero or non-finite gradient: such a gradient defines no subspace."""
    return bool(torch.isfinite(grad).all()) and bool(grad.abs().amax() > 0)


def _sampling_rtol(grad: torch.Tensor) -> float:
    # Singular values below sigma_1 * max(m, n) * eps(float32) are numerically zero.
    return max(grad.shape) * torch.finfo(torch.float32).eps


class SubspaceSelector(ABC):
    """Chooses an orthonormal (d, r) basis from an oriented gradient (d, k). Stateless, no schedule.

    A rule with options of its own declares them as dataclass fields with defaults; they are set from config
    through ``optimizer.lowrank.selector_options.<name>`` (see :func:`make_selector`) and checked by
    :meth:`problems`. Adding a rule is one subclass registered with :func:`register_selector`.
    """

    name: ClassVar[str]

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid option value, each naming ``prefix.<field>`` (none for a rule without options)."""
        return []

    def select(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor | None:
        """Returns the new basis (d, rank), orthonormal columns, or ``None`` for "no refresh"."""
        if grad.dim() != 2:
            raise ValueError(f"selector {self.name!r} needs a 2-D gradient, got shape {tuple(grad.shape)}")
        if not 1 <= rank <= min(grad.shape):
            raise ValueError(f"rank must be in [1, {min(grad.shape)}] for a gradient of shape {tuple(grad.shape)}")
        if not is_refreshable(grad):
            return None
        return self._basis(grad.detach(), rank, generator)

    @abstractmethod
    def _basis(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        """The rule itself, on a finite, non-zero gradient."""


@dataclasses.dataclass(frozen=True)
class DominantSelector(SubspaceSelector):
    """GaLore: the top-r left singular vectors of the gradient."""

    name: ClassVar[str] = "dominant"

    def _basis(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        u, _ = thin_svd(grad)  # (d, min(d, k))
        return u[:, :rank]


@dataclasses.dataclass(frozen=True)
class ImportanceSelector(SubspaceSelector):
    """SARA: r left singular vectors sampled without replacement with probability proportional to sigma."""

    name: ClassVar[str] = "importance"

    def _basis(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        u, s = thin_svd(grad)
        idx = importance_indices(s, rank, generator, rtol=_sampling_rtol(grad))
        return u[:, idx]


@dataclasses.dataclass(frozen=True)
class RandomSelector(SubspaceSelector):
    """GoLore: a Haar-uniform orthonormal basis, independent of the gradient's values."""

    name: ClassVar[str] = "random"

    def _basis(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        gaussian = torch.randn(grad.shape[0], rank, generator=generator, dtype=dtype)  # (d, r), on the CPU
        q, r = torch.linalg.qr(gaussian)
        # Folding sign(diag(R)) into Q makes the distribution exactly Haar (QR alone is biased by its sign choice).
        signs = torch.sign(torch.diagonal(r))
        q = q * torch.where(signs == 0, torch.ones_like(signs), signs)
        return q.to(grad.device)


@dataclasses.dataclass(frozen=True)
class RandomizedDominantSelector(SubspaceSelector):
    """Approximate ``dominant``: top-r of a seeded randomized SVD with k = r + ``oversampling``.

    Attributes:
        oversampling: extra range-finder columns beyond r (accuracy vs cost).
        power_iters: subspace iterations; each sharpens a slowly decaying spectrum.
    """

    name: ClassVar[str] = "randomized_dominant"
    oversampling: int = 16
    power_iters: int = 2

    def problems(self, prefix: str = "") -> list[str]:
        return _range_finder_problems(self, prefix)

    def _basis(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        u, _ = randomized_svd(grad, rank + self.oversampling, generator, self.power_iters)
        return u[:, :rank]


@dataclasses.dataclass(frozen=True)
class RandomizedImportanceSelector(SubspaceSelector):
    """Approximate ``importance``: samples r of the top k = r + ``oversampling`` randomized singular directions.

    Attributes:
        oversampling: k - r. The exact rule can draw any of the min(m, n) directions; this one only the top k.
        power_iters: subspace iterations of the range finder.
    """

    name: ClassVar[str] = "randomized_importance"
    oversampling: int = 16
    power_iters: int = 2

    def problems(self, prefix: str = "") -> list[str]:
        return _range_finder_problems(self, prefix)

    def _basis(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        # The range finder and the sampling draw from the same generator, in that fixed order.
        u, s = randomized_svd(grad, rank + self.oversampling, generator, self.power_iters)
        idx = importance_indices(s, rank, generator, rtol=_sampling_rtol(grad))
        return u[:, idx]


def _range_finder_problems(selector: Any, prefix: str) -> list[str]:
    return [
        *check(
            is_int(selector.oversampling, 0), dotted(prefix, "oversampling"), selector.oversampling, "an integer >= 0"
        ),
        *check(is_int(selector.power_iters, 0), dotted(prefix, "power_iters"), selector.power_iters, "an integer >= 0"),
    ]


SELECTORS: dict[str, type[SubspaceSelector]] = {
    cls.name: cls
    for cls in (
        DominantSelector,
        ImportanceSelector,
        RandomSelector,
        RandomizedDominantSelector,
        RandomizedImportanceSelector,
    )
}


def register_selector(cls: type[SubspaceSelector]) -> type[SubspaceSelector]:
    """Adds a selector class to ``SELECTORS`` under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, SubspaceSelector)) or not isinstance(
        getattr(cls, "name", None), str
    ):
        raise ValueError(f"register_selector: {cls!r} is not a SubspaceSelector subclass with a string ``name``")
    SELECTORS[cls.name] = cls
    return cls


def selector_fields(name: str) -> tuple[str, ...]:
    """The options (dataclass fields) that the rule called ``name`` declares."""
    cls = SELECTORS[name]
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()


def selector_problems(name: Any, options: Any = None, prefix: str = "") -> list[str]:
    """Every problem with rule ``name`` and its ``options`` (a mapping of its fields), keys under ``prefix``."""
    if not isinstance(name, str) or name not in SELECTORS:
        return [problem(prefix or "selector", name, join_accepted(sorted(SELECTORS))) + hint(SELECTOR_NAMES, name)]
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        return [problem(dotted(prefix, "options"), options, f"a mapping of {name!r}'s options")]
    fields = selector_fields(name)
    unknown = sorted(str(k) for k in options if k not in fields)
    if unknown:
        return [
            f"{dotted(prefix, unknown[0])}: unknown option of selector {name!r}; accepted: "
            f"{join_accepted(fields) if fields else 'none (this rule has no options)'}"
        ]
    return SELECTORS[name](**options).problems(prefix)


def make_selector(name: str, **options: Any) -> SubspaceSelector:
    """Builds the selector called ``name`` with ``options`` (its declared fields); raises ValueError naming the first
    unknown option, or every invalid value."""
    problems = selector_problems(name, options, f"selector_options.{name}" if name in SELECTORS else "selector")
    if problems:
        raise ValueError("; ".join(problems))
    return SELECTORS[name](**options)
