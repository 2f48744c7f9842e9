"""What happens to the base optimizer's moments when a parameter's basis changes.

With C = B_new^T B_old (r, r) (both bases column-orthonormal (d, r)), a projected gradient expressed in the old
basis maps to the new one as R_new = C R_old for a left projection (R is (r, n)) and R_new = R_old C^T for a right
one (R is (m, r)): always along the projected dimension.

* ``keep`` (default; GaLore and Fira): moments are left unchanged, i.e. read in the new basis as if nothing moved.
  Keeps results comparable with the papers.
* ``rotate``: first moment M <- C M (exact). The second moment has no exact rotation (it is an element-wise square);
  V <- (C * C) V with element-wise squared coefficients is used, which keeps it non-negative. An approximation.
  Compact moments (bf16, 8-bit codes with block scales; :mod:`lowrank.moment_storage`) are decoded to float32,
  rotated and re-encoded in their stored format; moments narrower than float32 are rotated in float32 and rounded
  once.
* ``reset``: the base state of the parameter is cleared; the base re-initialises it (and its bias correction) on
  the next step.
"""

from __future__ import annotations

from typing import Any

import torch

from lowrank.moment_storage import read_moment, write_moment

MOMENT_POLICIES: tuple[str, ...] = ("keep", "rotate", "reset")


def _apply(matrix: torch.Tensor, moment: torch.Tensor, side: str) -> torch.Tensor:
    matrix = matrix.to(moment.dtype)
    return moment @ matrix.T if side == "right" else matrix @ moment


def apply_moment_policy(
    policy: str,
    base_state: dict[str, Any],
    old_basis: torch.Tensor,
    new_basis: torch.Tensor,
    side: str,
    first_moment_keys: tuple[str, ...],
    second_moment_keys: tuple[str, ...],
) -> None:
    """Updates ``base_state`` (the base optimizer's state of one stand-in) in place for a basis change."""
    if policy == "keep" or not base_state:
        return
    if policy == "reset":
        base_state.clear()
        return
    if policy != "rotate":
        raise ValueError(f"moment_policy: unknown value {policy!r}; accepted: {', '.join(MOMENT_POLICIES)}")
    dtype = torch.promote_types(new_basis.dtype, torch.float32)  # float32 or wider, also for bf16 bases
    change = new_basis.to(dtype).T @ old_basis.to(dtype)  # (r, r)
    squared = change.square()
    for keys, matrix, signed in ((first_moment_keys, change, True), (second_moment_keys, squared, False)):
        for key in keys:
            if key in base_state:  # read/write keep the stored format: fp32, bf16 or 8-bit codes with scales
                moment = read_moment(base_state, key, signed)
                write_moment(base_state, key, _apply(matrix, moment, side), signed)
