"""One row of ``bench/memory.py`` in its own process: build the recipe's model in the row's dtype, a few training
steps with a refresh, and the peak memory above the baseline after each phase.

CPU: resident memory (``ru_maxrss``, the process's peak so far) minus the resident memory just before the model is
built; GPU: ``torch.cuda.max_memory_allocated`` (the allocator starts at zero). Reading the peak after every phase
says which phase set it. Projected-gradient rows reset the peak after step 0 (Linux: ``/proc/self/clear_refs``),
so that they report the steady state; their phases keep step 0's.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import torch

from lowrank.config import DEFAULT_TARGETS
from lowrank.factory import build_optimizer
from lowrank.optimizer import LowRankOptimizer
from lowrank.per_layer import enable_per_layer
from lowrank.poet import PoetConfig, apply_poet, merge_poet
from lowrank.projected import enable_projected_gradients
from lowrank_recipes.recipes.model import Llama, causal_lm_loss

from _common import current_rss_bytes, peak_rss_bytes, reset_peak
from _memory_rows import SIZES, VARIANTS, model_config, optimizer_settings, poet_block


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors with data (moments, bases, scales; 0-dim counters excluded)."""
    entries = optimizer.state.values()
    return sum(v.numel() * v.element_size() for e in entries for v in e.values() if torch.is_tensor(v) and v.dim())


def _warm_up(size: str, variant: str, device: torch.device) -> None:
    """Two steps of a tiny model with the row's optimizer: torch's one-time costs (kernel libraries, thread pools,
    the autograd engine, the SVD's workspace queries) happen before the baseline instead of inside the peak."""
    spec = SIZES[size]
    default = torch.get_default_dtype()
    torch.set_default_dtype(spec.dtype)
    try:
        with torch.device(device):
            net = Llama(
                dataclasses.replace(SIZES["tiny"].config, activation_checkpointing=VARIANTS[variant].checkpointing)
            )
    finally:
        torch.set_default_dtype(default)
    settings = optimizer_settings(size, variant, 1)
    if "lowrank" in settings:
        settings["lowrank"]["rank"] = 8
    if "poet" in settings:
        settings["poet"]["block_size"] = 8
        apply_poet(net, PoetConfig(block_size=8), DEFAULT_TARGETS, seed=0)
    optimizer = build_optimizer(net, settings)
    ids = torch.randint(0, 512, (1, 33), device=device)
    for _ in range(2):
        causal_lm_loss(net(ids[:, :-1]), ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del net, optimizer
    gc.collect()


def run_row(size: str, variant: str, stagger: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Runs ``steps`` training steps of the row; the peak bytes above the baseline, overall and after each phase,
    and the optimizer's state bytes counted from its tensors."""
    spec, row = SIZES[size], VARIANTS[variant]
    _warm_up(size, variant, device)
    baseline = current_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def peak() -> int:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device)
        return peak_rss_bytes() - baseline

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(spec.dtype)  # built in the row's dtype, as Lightning's "bf16-true" does
    try:
        with torch.device(device):
            net = Llama(model_config(size, variant))
        if row.optimizer == "poet":  # W = R W0 P on the projections, in the row's dtype
            apply_poet(net, PoetConfig(block_size=poet_block(size, variant)), DEFAULT_TARGETS, seed=0)
    finally:
        torch.set_default_dtype(default)
    phases = {"build": peak()}
    optimizer = build_optimizer(net, optimizer_settings(size, variant, stagger))
    updater = enable_per_layer(optimizer) if row.per_layer else None  # type: ignore[arg-type]
    projected = enable_projected_gradients(net, optimizer) if row.projected else None  # type: ignore[arg-type]
    ids = torch.randint(0, spec.config.vocab_size, (spec.micro_batch, spec.seq_len + 1), device=device)
    refreshed: list[int] = []
    for step in range(steps):
        if isinstance(optimizer, LowRankOptimizer):
            refreshed.append(len(optimizer.due(step)))
        loss = causal_lm_loss(net(ids[:, :-1]), ids[:, 1:])
        phases[f"step{step}.forward"] = peak()
        loss.backward()
        del loss
        phases[f"step{step}.backward"] = peak()
        optimizer.step()
        phases[f"step{step}.optimizer"] = peak()
        if row.optimizer == "poet" and step == 1:  # a merge as after step T_m - 1: the gradients still alive, as in
            merge_poet(net, optimizer, step + 1)  # Lightning (it zeroes them before the next step's backward)
            phases[f"step{step}.merge"] = peak()
        optimizer.zero_grad(set_to_none=True)
        if step == 0 and projected is not None:  # steady state: from step 1 on (step 0 formed every G)
            reset_peak(device)
    if updater is not None:
        updater.remove()
    if projected is not None:
        projected.remove()
    return {"measured_bytes": peak(), "phases": phases, "state_bytes": _state_bytes(optimizer), "refreshed": refreshed}
