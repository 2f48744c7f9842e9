"""How one optimizer moment is stored (fp32, bf16 or block-wise 8-bit) and how to read, write and convert it.

The format is read from the state itself, so any code holding a state dict can use a moment without knowing which
optimizer wrote it (the ``rotate`` moment policy of :mod:`lowrank.moments` does):

* ``fp32``: ``state[key]`` is a float tensor of the parameter's dtype or wider (torch.optim's own layout).
* ``bf16``: ``state[key]`` is a bfloat16 tensor.
* ``8bit``: ``state[key]`` holds uint8 codes (the parameter's shape) and ``state[key + "_absmax"]`` the float32
  block scales, see :mod:`lowrank.quantization`. First moments use the signed map, second moments the unsigned one.

Reads return float32 (or the stored dtype if wider); for ``fp32`` storage they return the stored tensor itself, so
in-place updates need no write. Writes keep the stored format. Row ranges (``rows``) address the (rows, n) view of
:func:`lowrank.quantization.rows_view_shape`; blocks never span rows, so a row range is encoded independently.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowrank.quantization import (
    dequantize_blockwise,
    quantize_blockwise,
    quantized_bytes,
    rows_view_shape,
    scales_shape,
)

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "8bit")
# The moments of Adam(W) and whether their values can be negative (which 8-bit code map they use).
ADAM_MOMENTS: dict[str, bool] = {"exp_avg": True, "exp_avg_sq": False}
_ALL = slice(None)


def absmax_key(key: str) -> str:
    return f"{key}_absmax"


def stored_precision(state: dict[str, Any], key: str) -> str:
    """``"8bit"``, ``"bf16"`` or ``"fp32"`` (any other float dtype) for ``state[key]``."""
    value = state[key]
    if value.dtype == torch.uint8 and absmax_key(key) in state:
        return "8bit"
    return "bf16" if value.dtype == torch.bfloat16 else "fp32"


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(rows_view_shape(tensor.shape))


def read_rows(
    state: dict[str, Any], key: str, signed: bool, rows: slice = _ALL, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rows ``rows`` of the (rows, n) view of moment ``key`` in ``dtype`` or the stored dtype if that is wider."""
    stored = state[key]
    precision = stored_precision(state, key)
    if precision == "8bit":
        return dequantize_blockwise(_rows(stored)[rows], state[absmax_key(key)][rows], signed, dtype=dtype)
    view = _rows(stored)[rows]
    return view if precision == "fp32" and view.dtype.itemsize >= dtype.itemsize else view.to(dtype)


def write_rows(state: dict[str, Any], key: str, value: torch.Tensor, signed: bool, rows: slice = _ALL) -> None:
    """Stores ``value`` (rows, n) into rows ``rows`` of moment ``key``, in its stored format."""
    stored = state[key]
    view = _rows(stored)[rows]
    if stored_precision(state, key) == "8bit":
        absmax = state[absmax_key(key)]
        n = view.shape[1]
        length = math.ceil(n / absmax.shape[1]) if n else 1  # balanced blocks: the layout follows from the scales
        quantize_blockwise(value, signed, length, out=(view, absmax[rows]))
    elif value.data_ptr() != view.data_ptr() or value.dtype != view.dtype:
        view.copy_(value)


def read_moment(state: dict[str, Any], key: str, signed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Moment ``key`` in its own shape, in ``dtype`` or the stored dtype if that is wider (fp32: the stored tensor)."""
    stored = state[key]
    if stored_precision(state, key) == "8bit":
        return read_rows(state, key, signed, _ALL, dtype).view(stored.shape)
    return stored if stored.dtype.itemsize >= dtype.itemsize and stored.dtype != torch.bfloat16 else stored.to(dtype)


def write_moment(state: dict[str, Any], key: str, value: torch.Tensor, signed: bool) -> None:
    """Stores ``value`` (the moment's shape) into moment ``key`` in its stored format."""
    stored = state[key]
    if stored_precision(state, key) == "8bit":
        write_rows(state, key, _rows(value.contiguous()), signed)
    elif value is not stored:
        stored.copy_(value)


def store_moment(
    state: dict[str, Any], key: str, value: torch.Tensor, precision: str, signed: bool, block_size: int = 256
) -> None:
    """Replaces moment ``key`` by ``value`` stored with ``precision`` (``value``'s dtype for ``fp32``)."""
    _check_precision(precision)
    state.pop(absmax_key(key), None)
    if precision == "8bit":
        state[key], state[absmax_key(key)] = quantize_blockwise(value, signed, block_size)
    elif precision == "bf16":
        state[key] = value.to(torch.bfloat16, copy=True).contiguous()
    else:
        state[key] = value.clone().contiguous()


def zero_moment(
    state: dict[str, Any],
    key: str,
    like: torch.Tensor,
    precision: str,
    dtype: torch.dtype = torch.float32,
    block_size: int = 256,
) -> None:
    """Creates moment ``key`` of ``like``'s shape and device, all zero, stored with ``precision``."""
    _check_precision(precision)
    state.pop(absmax_key(key), None)
    if precision == "8bit":  # code 0 is 0 in both maps; no float32 temporary of the full shape
        state[key] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
        state[absmax_key(key)] = torch.zeros(scales_shape(like.shape, block_size), device=like.device)
    else:
        state[key] = torch.zeros(like.shape, dtype=torch.bfloat16 if precision == "bf16" else dtype, device=like.device)


def convert_state(
    state: dict[str, Any],
    to_precision: str,
    dtype: torch.dtype = torch.float32,
    block_size: int = 256,
    moments: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """A copy of one parameter's state with its moments stored in ``to_precision``.

    Args:
        state: e.g. ``optimizer.state[p]`` or an entry of a saved ``state_dict()["state"]``.
        to_precision: ``fp32`` | ``bf16`` | ``8bit``.
        dtype: the float dtype of ``fp32`` moments (the parameter's compute dtype).
        block_size: block size of ``8bit`` moments.
        moments: moment keys and whether they are signed (default: Adam's ``exp_avg`` and ``exp_avg_sq``).

    Returns:
        A new dict: converted moments (a moment already in ``to_precision`` is shared, not copied, so bit-exact
        resumes stay bit-exact), every other entry (``step``, ...) unchanged.
    """
    _check_precision(to_precision)
    out = dict(state)
    for key, signed in (moments or ADAM_MOMENTS).items():
        if key not in state:
            continue
        current = stored_precision(state, key)
        if current == to_precision and (current != "fp32" or state[key].dtype == dtype):
            continue
        out.pop(absmax_key(key), None)
        store_moment(out, key, read_moment(state, key, signed, dtype).to(dtype), to_precision, signed, block_size)
    return out


def moment_bytes(
    shape: tuple[int, ...], precision: str, dtype: torch.dtype = torch.float32, block_size: int = 256
) -> int:
    """Bytes of one moment of ``shape`` stored with ``precision`` (codes and scales for ``8bit``)."""
    _check_precision(precision)
    if precision == "8bit":
        return quantized_bytes(shape, block_size)
    itemsize = 2 if precision == "bf16" else dtype.itemsize
    return math.prod(shape) * itemsize


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"state_precision: invalid value {precision!r}; accepted: {', '.join(PRECISIONS)}")
