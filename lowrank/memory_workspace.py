"""Temporaries of a training step that :mod:`lowrank.memory` adds to the persistent components at the peak: the
base optimizer's update, the subspace refresh, the projected gradients. Counted from shapes, nothing allocated.

Notation as in :mod:`lowrank.memory`; s the parameter dtype's size, numel(p) a tensor's element count.

* Base update (per parameter group of the base optimizer, in its parameter order):

  - torch's AdamW, single-tensor implementation (its default on a CPU): ``denom = (v.sqrt() / c).add_(eps)`` makes
    two temporaries of the parameter's size while the previous parameter's ``denom`` is still referenced, so at
    parameter i: s (numel(p_{i-1}) + 2 numel(p_i)); the maximum over i.
  - torch's AdamW, foreach implementation (its default on CUDA): ``_foreach_sqrt`` of every second moment of the
    group at once: s x sum numel over the group; the maximum over groups.
  - :class:`lowrank.CompactAdamW` (bf16 and 8-bit states): rows in chunks of at most ``chunk`` elements (2^20 on a
    CPU, 2^26 on an accelerator) with ``COMPACT_TEMPORARIES`` float32 temporaries of a chunk's size (the
    dequantised moments, the denominator, the quantiser's work; one more, the gradient's float32 copy, when the
    parameter is not float32), so 4 x 7 x min(numel, chunk rows x n) for float32 parameters.

* Refresh of one (d, k) oriented gradient, j = min(d, k), float32 work (a bf16 gradient is copied first: 4 d k):
  exact SVD (``dominant``, ``importance``) 4 (d k + d j + j k) (LAPACK's copy of the input, U, V^T);
  randomized range finder (``randomized_*``) 7 d k: a contiguous copy of the oriented gradient and the products
  with it, 1.75 x 4 d k measured for float32 at ranks 16 to 528 (for bf16 gradients 1.5 to 2.6 x 4 d k in all, so
  the count, copy included, is high by up to 1.8x there: tens of MB at 1B, under 1% of the total).

* Projected gradients: an ordinary step projects every low-rank gradient before the base runs, R (max(m, n) x r in
  the parameter dtype) for all of them at once, and gives every stand-in (the base's (m, r) workspace) its storage:
  2 s sum max(m, n) r. Per-layer updates hold one weight's at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lowrank.compact_adamw import CPU_CHUNK_SIZE, DEVICE_CHUNK_SIZE
from lowrank.quantization import rows_view_shape

# float32 temporaries of one chunk in CompactAdamW's update, measured by the profiler's memory events (the 8-bit
# codes' int64 indices count twice); a parameter that is not float32 adds its float32 gradient copy.
COMPACT_TEMPORARIES = 7
EXACT_SELECTORS: tuple[str, ...] = ("dominant", "importance")


def svd_bytes(shape: tuple[int, int], rank: int, selector: str, itemsize: int) -> int:
    """Peak temporaries of one refresh of a (d, k) oriented gradient (module docstring); ``random`` draws a
    Gaussian (d, r) and its QR: 8 d r."""
    d, k = shape
    copy = d * k * 4 if itemsize != 4 else 0
    if selector == "random":
        return 8 * d * rank
    if selector in EXACT_SELECTORS:
        j = min(d, k)
        return copy + 4 * (d * k + d * j + j * k)
    return copy + 7 * d * k


def adamw_single_tensor_bytes(groups: Sequence[Sequence[int]], itemsize: int) -> int:
    """torch AdamW's single-tensor temporaries: max over i of s (numel_{i-1} + 2 numel_i) within a group."""
    peak = 0
    for sizes in groups:
        previous = 0
        for numel in sizes:
            peak = max(peak, itemsize * (previous + 2 * numel))
            previous = numel
    return peak


def adamw_foreach_bytes(groups: Sequence[Sequence[int]], itemsize: int) -> int:
    """torch AdamW's foreach temporaries: s x the largest group's total element count."""
    return max((itemsize * sum(sizes) for sizes in groups), default=0)


def compact_bytes(shapes: Sequence[tuple[int, ...]], itemsize: int, device: str) -> int:
    """CompactAdamW's temporaries for its largest chunk (rows of the (rows, n) view, n the last dimension)."""
    chunk = CPU_CHUNK_SIZE if device == "cpu" else DEVICE_CHUNK_SIZE
    peak = 0
    for shape in shapes:
        numel = math.prod(shape)
        _, n = rows_view_shape(shape)
        rows = max(1, chunk // max(n, 1))
        temporaries = COMPACT_TEMPORARIES + (itemsize != 4)
        peak = max(peak, 4 * temporaries * min(numel, rows * n))
    return peak
