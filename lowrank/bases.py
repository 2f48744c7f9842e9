"""Base optimizers that a low-rank optimizer runs on its projected (stand-in) tensors.

A base optimizer is any ``torch.optim.Optimizer``. The low-rank optimizer hands it, for every low-rank weight, a
stand-in tensor of the projected shape that is zero before each step and whose gradient is the projected gradient
R; after the base step the stand-in holds the base's update of R (for Adam: -lr * m_hat / (sqrt(v_hat) + eps)).
Plain parameters (embeddings, head, norms) are handed to the base unchanged. Fused, foreach or 8-bit bases
therefore work without a forked update rule.

A :class:`BaseSpec` tells the low-rank optimizer what it cannot infer: which state entries are first and second
moments (for the ``rotate`` moment policy) and whether the base's step depends on the parameter's value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from lowrank.compact_adamw import CompactAdamW, compact_state_bytes

BaseFactory = Callable[..., torch.optim.Optimizer]


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    """How to build and read one kind of base optimizer.

    Attributes:
        name: registry key.
        factory: ``factory(param_groups, **options)`` builds the base optimizer.
        first_moment_keys: state entries rotated by C (``rotate`` policy).
        second_moment_keys: state entries rotated by C * C (element-wise squared, keeps them non-negative).
        relative_step: the base scales its step by the parameter's RMS (Adafactor). A zero stand-in has RMS 0, so
            the low-rank optimizer gives such a base one group per parameter and sets that group's RMS floor
            ``eps[1]`` to max(eps2, RMS(W)) of the full weight W before each step (GaLore's Adafactor also scales
            by the full weight).
        state_elements: moment elements the base keeps for a tensor of a given shape (the group table's estimate).
        state_bytes: ``state_bytes(shape, dtype)``, bytes of the base's state for a parameter of that shape and dtype
            (codes and scales of 8-bit states included, scalar counters excluded); None means
            ``state_elements(shape) * dtype.itemsize``. Read it through :meth:`estimate_state_bytes`.
    """

    name: str
    factory: BaseFactory
    first_moment_keys: tuple[str, ...] = ()
    second_moment_keys: tuple[str, ...] = ()
    relative_step: bool = False
    state_elements: Callable[[tuple[int, ...]], int] = lambda shape: 2 * math.prod(shape)
    state_bytes: Callable[[tuple[int, ...], torch.dtype], int] | None = None

    @property
    def rotatable(self) -> bool:
        return bool(self.first_moment_keys or self.second_moment_keys)

    def estimate_state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes of the base's state for a parameter of ``shape`` and ``dtype`` (see ``state_bytes``)."""
        if self.state_bytes is not None:
            return self.state_bytes(tuple(shape), dtype)
        return self.state_elements(tuple(shape)) * dtype.itemsize

    def prepare_group(self, base_group: dict[str, Any], weight: torch.Tensor, user_eps: Any) -> None:
        """Per-step adjustment of a per-parameter base group (only for ``relative_step`` bases)."""
        if self.relative_step:
            eps1, eps2 = user_eps
            rms = float(weight.detach().norm()) / weight.numel() ** 0.5
            base_group["eps"] = (eps1, max(eps2, rms))


BASES: dict[str, BaseSpec] = {
    "adamw": BaseSpec(
        "adamw", torch.optim.AdamW, first_moment_keys=("exp_avg",), second_moment_keys=("exp_avg_sq", "max_exp_avg_sq")
    ),
    "adam": BaseSpec(
        "adam", torch.optim.Adam, first_moment_keys=("exp_avg",), second_moment_keys=("exp_avg_sq", "max_exp_avg_sq")
    ),
    # Adafactor factors the second moment of a matrix into row and column statistics and keeps no first moment.
    "adafactor": BaseSpec(
        "adafactor",
        torch.optim.Adafactor,
        relative_step=True,
        state_elements=lambda shape: sum(shape) if len(shape) == 2 else math.prod(shape),
    ),
}


def _compact_adamw_spec(name: str, precision: str) -> BaseSpec:
    """AdamW with bf16 or 8-bit moments (lowrank.compact_adamw); its moments rotate through lowrank.moment_storage."""
    return BaseSpec(
        name,
        functools.partial(CompactAdamW, state_precision=precision),
        first_moment_keys=("exp_avg",),
        second_moment_keys=("exp_avg_sq",),
        state_bytes=functools.partial(compact_state_bytes, state_precision=precision),
    )


def register_base(spec: BaseSpec) -> BaseSpec:
    """Adds a base optimizer kind to ``BASES`` (the bf16 and 8-bit AdamW bases below are registered this way)."""
    BASES[spec.name] = spec
    return spec


register_base(_compact_adamw_spec("adamw_bf16", "bf16"))
register_base(_compact_adamw_spec("adamw8bit", "8bit"))


def resolve_base(base: str | BaseFactory | BaseSpec) -> BaseSpec:
    """A spec from a registry name, a spec, or any optimizer factory (moments then unknown: no ``rotate``)."""
    if isinstance(base, BaseSpec):
        return base
    if isinstance(base, str):
        if base not in BASES:
            raise ValueError(f"base: unknown value {base!r}; accepted: {', '.join(sorted(BASES))}")
        return BASES[base]
    if callable(base):
        return BaseSpec(getattr(base, "__name__", "custom"), base)
    raise ValueError(f"base: expected a name ({', '.join(sorted(BASES))}), a BaseSpec or a factory, got {base!r}")
