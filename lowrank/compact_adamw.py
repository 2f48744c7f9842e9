"""CompactAdamW: torch.optim.AdamW with its moments stored in fp32, bf16 or block-wise 8 bits.

The update is AdamW's (decoupled weight decay, bias correction; no amsgrad):

    W <- W * (1 - lr * wd)
    m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g^2
    W <- W - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

``state_precision`` (a group key) says how m and v are kept between steps (:mod:`lowrank.moment_storage`):

* ``fp32``: like torch (the parameter's dtype, float32 at least); the same arithmetic as ``torch.optim.AdamW``'s
  single-tensor path, so the results are equal.
* ``bf16``: bfloat16, rounded to nearest. bf16 keeps 8 significant bits, so a change of v smaller than about 0.4%
  is rounded away: with beta2 = 0.999, v can grow but not decay (the factor 0.999 is lost in rounding). Fine for
  short runs and tests; prefer ``8bit`` (whose block scale decays exactly) or ``fp32`` for long ones.
* ``8bit``: uint8 codes plus float32 block scales (:mod:`lowrank.quantization`, signed map for m, unsigned for v).
  Tensors with fewer than ``min_8bit_size`` elements (norms, biases: negligible memory) stay fp32, as in
  bitsandbytes.

Per parameter, the moments are decoded to float32, updated and re-encoded, one block of rows at a time
(``chunk_size`` elements, blocks never span rows): the float32 working memory is one chunk, not one parameter, and
on a CPU the chunk stays in cache. The state holds only tensors (``step`` is a 0-dim float32 tensor like torch's),
so ``torch.load(weights_only=True)`` works. A state whose stored precision differs from its group's (a checkpoint
saved with another precision, or a changed group) is converted at load and at the next step
(:func:`lowrank.moment_storage.convert_state`); at load, this optimizer's storage options win over the
checkpoint's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from lowrank.checks import is_int, is_number
from lowrank.moment_storage import (
    ADAM_MOMENTS,
    PRECISIONS,
    convert_state,
    moment_bytes,
    read_rows,
    stored_precision,
    write_rows,
    zero_moment,
)
from lowrank.quantization import rows_view_shape
from lowrank.regroup import regroup_by_name

STORAGE_KEYS: tuple[str, ...] = ("state_precision", "min_8bit_size", "block_size")  # group keys kept on load
CPU_CHUNK_SIZE = 1 << 20  # 4 MiB of float32 per temporary: fewer Python-level chunk iterations (measured fastest)
# accelerators: 16M elements a chunk (the weights up to 350M whole; 7-8 float32 temporaries of 0.54 GB at most, where
# 2^26 cost 2.15 GB, more than a 7B run's projected gradients at rank 512)
DEVICE_CHUNK_SIZE = 1 << 24


def _problem(group: dict[str, Any]) -> str | None:
    """The first invalid hyperparameter of ``group`` as 'key: invalid value ...; accepted: ...', or None."""
    betas = group["betas"]
    checks = [
        ("lr", is_number(group["lr"]) and group["lr"] >= 0, "a number >= 0"),
        (
            "betas",
            isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
            "two numbers in [0, 1)",
        ),
        ("eps", is_number(group["eps"]) and group["eps"] >= 0, "a number >= 0"),
        ("weight_decay", is_number(group["weight_decay"]) and group["weight_decay"] >= 0, "a number >= 0"),
        ("state_precision", group["state_precision"] in PRECISIONS, " | ".join(PRECISIONS)),
        ("min_8bit_size", is_int(group["min_8bit_size"]) and group["min_8bit_size"] >= 0, "an integer >= 0"),
        ("block_size", is_int(group["block_size"]) and group["block_size"] >= 1, "an integer >= 1"),
    ]
    for key, ok, accepted in checks:
        if not ok:
            return f"{key}: invalid value {group[key]!r}; accepted: {accepted}"
    return None


def effective_precision(numel: int, state_precision: str, min_8bit_size: int) -> str:
    """The precision a tensor of ``numel`` elements is stored with: tiny tensors stay fp32 in ``8bit`` mode."""
    return "fp32" if state_precision == "8bit" and numel < min_8bit_size else state_precision


def compact_state_bytes(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    state_precision: str,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> int:
    """Bytes of CompactAdamW's moments (codes and scales included, ``step`` excluded) for a parameter of ``shape``."""
    precision = effective_precision(math.prod(shape), state_precision, min_8bit_size)
    compute = torch.promote_types(dtype, torch.float32)
    return 2 * moment_bytes(tuple(shape), precision, compute, block_size)


class CompactAdamW(torch.optim.Optimizer):
    """AdamW with fp32, bf16 or 8-bit moments (module docstring).

    Args:
        params: parameters or groups; groups may set any hyperparameter below except ``chunk_size``.
        lr: learning rate.
        betas: (beta1, beta2).
        eps: added to sqrt(v_hat).
        weight_decay: decoupled weight decay (torch's default 1e-2).
        state_precision: ``fp32`` | ``bf16`` | ``8bit``.
        min_8bit_size: in ``8bit`` mode, tensors with fewer elements keep fp32 moments (bitsandbytes: 4096).
        block_size: longest 8-bit block (blocks are aligned to rows; :mod:`lowrank.quantization`).
        chunk_size: elements decoded at a time in ``bf16``/``8bit`` mode (whole rows, at least one);
            default 2^20 on a CPU (``CPU_CHUNK_SIZE``), 2^24 elsewhere (``DEVICE_CHUNK_SIZE``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_precision: str = "fp32",
        min_8bit_size: int = 4096,
        block_size: int = 256,
        chunk_size: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            state_precision=state_precision,
            min_8bit_size=min_8bit_size,
            block_size=block_size,
        )
        problem = _problem(defaults)
        if problem:
            raise ValueError(problem)
        if chunk_size is not None and not (is_int(chunk_size) and chunk_size >= 1):
            raise ValueError(f"chunk_size: invalid value {chunk_size!r}; accepted: an integer >= 1, or None")
        self.chunk_size = chunk_size
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        problem = _problem(self.param_groups[-1])
        if problem:
            self.param_groups.pop()
            raise ValueError(problem)

    # ----------------------------------------------------------------------------------------------- state
    def _target(self, param: torch.Tensor, group: dict[str, Any]) -> tuple[str, torch.dtype]:
        precision = effective_precision(param.numel(), group["state_precision"], group["min_8bit_size"])
        return precision, torch.promote_types(param.dtype, torch.float32)

    def _prepared_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The parameter's state, created (zero moments) or converted to its group's precision."""
        state = self.state[param]
        precision, dtype = self._target(param, group)
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)  # on the CPU, like torch's non-capturable AdamW
            for key in ADAM_MOMENTS:
                zero_moment(state, key, param, precision, dtype, group["block_size"])
        elif any(_needs_conversion(state, key, precision, dtype) for key in ADAM_MOMENTS if key in state):
            converted = convert_state(state, precision, dtype, group["block_size"])
            state.clear()
            state.update(converted)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading with two differences. Moments keep their stored dtype (torch would cast uint8 codes and
        bf16 moments to the parameter's dtype). The storage options (``STORAGE_KEYS``) are configuration, not state:
        this optimizer's values win over the checkpoint's, and the loaded moments are converted to them, so a
        checkpoint saved with one precision resumes with another. A state dict of another group layout of the same
        named parameters is matched by name first (:mod:`lowrank.regroup`)."""
        state_dict = regroup_by_name(self, state_dict) or state_dict
        saved = state_dict["state"]
        steps_only = {index: {k: v for k, v in entry.items() if k == "step"} for index, entry in saved.items()}
        storage = [{key: group[key] for key in STORAGE_KEYS} for group in self.param_groups]
        super().load_state_dict({**state_dict, "state": steps_only})
        for group, options in zip(self.param_groups, storage):
            group.update(options)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        # saved index -> (parameter, group); torch has checked that the group sizes match
        owners = dict(zip(saved_ids, ((p, g) for g in self.param_groups for p in g["params"])))
        for index, entry in saved.items():
            if index not in owners:
                continue
            param, group = owners[index]
            state = self.state[param]
            for key, value in entry.items():
                if key != "step":
                    state[key] = value.to(device=param.device) if torch.is_tensor(value) else value
            if "exp_avg" in state:
                self._prepared_state(param, group)

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("CompactAdamW does not support sparse gradients")
                state = self._prepared_state(param, group)
                state["step"] += 1
                if group["weight_decay"] != 0:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                self._update(param, state, group, float(state["step"].item()))
        return loss

    def _update(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any], step: float) -> None:
        beta1, beta2 = group["betas"]
        step_size = group["lr"] / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        eps, grad = group["eps"], param.grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if exp_avg.dtype == param.dtype and stored_precision(state, "exp_avg") == "fp32":
            # torch.optim.AdamW's single-tensor arithmetic, whole tensors in place
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            return
        dtype = torch.promote_types(param.dtype, torch.float32)
        work = param if param.is_contiguous() else param.contiguous()
        rows, n = rows_view_shape(param.shape)
        weights, grads = work.view(rows, n), grad.reshape(rows, n)
        chunk = self.chunk_size or (CPU_CHUNK_SIZE if param.device.type == "cpu" else DEVICE_CHUNK_SIZE)
        per_chunk = max(1, chunk // max(n, 1))
        for start in range(0, rows, per_chunk):
            sl = slice(start, start + per_chunk)
            g = grads[sl].to(dtype)
            m = read_rows(state, "exp_avg", True, sl, dtype)
            v = read_rows(state, "exp_avg_sq", False, sl, dtype)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            if weights.dtype == dtype:
                weights[sl].addcdiv_(m, denom, value=-step_size)
            else:  # a bf16 / fp16 weight: the update in float32, rounded once
                weights[sl].add_(m.div(denom).mul_(-step_size))
            write_rows(state, "exp_avg", m, True, sl)
            write_rows(state, "exp_avg_sq", v, False, sl)
        if work is not param:
            param.copy_(work)


def _needs_conversion(state: dict[str, Any], key: str, precision: str, dtype: torch.dtype) -> bool:
    current = stored_precision(state, key)
    return current != precision or (current == "fp32" and state[key].dtype != dtype)
