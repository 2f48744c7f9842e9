"""Projected gradients under DDP (2 gloo ranks) against one process on the ordinary path, and an exact resume.

A tiny LLaMA in float64, 12 optimizer steps of 2 accumulated micro-batches (refreshes at steps 0, 3, 6 and 9: first
bases, then the importance selector with the ``rotate`` moment policy), each rank on its half of every micro-batch.
Checked:

* the weights after 12 steps equal DDP on the ordinary path to rtol 1e-10 / atol 1e-13, and one process training the
  whole batches on the ordinary path to fp32 tolerance (DDP's average of the halves' gradients differs from the
  whole batch's by rounding, which Adam's first steps amplify to about 1e-8 on either path);
* under DDP the projected weights do not require grad (kept out of DDP's reducer) and have no gradient after a
  non-refresh step's backward, while their companions have R;
* a run stopped after step 6 (between refreshes) and rebuilt from the model's and the optimizer's state dicts
  repeats the uninterrupted run's weights bitwise; the model's state dict holds no companion.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowrank.factory import build_optimizer
from lowrank.projected import COMPANION, enable_projected_gradients
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss

from .spawn import run_ranks

pytestmark = [pytest.mark.multiprocess]

WORLD, STEPS, ACCUMULATE, STOP = 2, 12, 2, 6
TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, max_seq_len=16)
SETTINGS = {
    "name": "lowrank",
    "lr": 1e-2,
    "lowrank": {"rank": 4, "selector": "importance", "moment_policy": "rotate", "seed": 3},
    "refresh": {"update_gap": 3},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Llama(TINY).double()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY.vocab_size, (4, 9), generator=g) for _ in range(STEPS * ACCUMULATE)]


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss(model(ids[:, :-1]), ids[:, 1:]) / ACCUMULATE


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reference() -> dict[str, torch.Tensor]:
    """One process, the ordinary path, the whole micro-batches."""
    model, batches = _model(), _batches()
    optimizer = build_optimizer(model, SETTINGS)
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            _loss(model, batches[step * ACCUMULATE + micro]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _weights(model)


def _build(
    state: dict | None = None, projected: bool = True
) -> tuple[nn.Module, DistributedDataParallel, torch.optim.Optimizer]:
    model = _model()
    if state is not None:
        model.load_state_dict(state["model"])
    optimizer = build_optimizer(model, SETTINGS)
    if projected:
        enable_projected_gradients(model, optimizer)  # freezes the weights: before DDP wraps the model
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    return model, DistributedDataParallel(model, gradient_as_bucket_view=True), optimizer


def _train(model, ddp, optimizer, steps: range, rank: int, seen: dict) -> None:
    batches = _batches()
    half = slice(rank * 2, rank * 2 + 2)  # this rank's 2 of the 4 sequences
    projected = [p for p in model.parameters() if hasattr(p, "_lowrank_projected")]
    for step in steps:
        for micro in range(ACCUMULATE):
            ids = batches[step * ACCUMULATE + micro][half]
            if micro < ACCUMULATE - 1:
                with ddp.no_sync():
                    _loss(ddp, ids).backward()
            else:
                _loss(ddp, ids).backward()
        if step == 1:  # not a refresh step
            seen["frozen"] = all(not p.requires_grad for p in projected) and len(projected) == 14
            seen["no_full"] = all(p.grad is None for p in projected)
            seen["companions"] = all(p._lowrank_projected.grad is not None for p in projected)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        seen: dict = {}
        model, ddp, optimizer = _build()
        _train(model, ddp, optimizer, range(STEPS), rank, seen)
        full = _weights(model)
        model, ddp, optimizer = _build(projected=False)
        _train(model, ddp, optimizer, range(STEPS), rank, {})
        ordinary = _weights(model)

        model, ddp, optimizer = _build()
        _train(model, ddp, optimizer, range(STOP), rank, {})
        state = {"model": _weights(model), "optimizer": optimizer.state_dict()}
        model, ddp, optimizer = _build(state)
        _train(model, ddp, optimizer, range(STOP, STEPS), rank, {})
        torch.save(
            {
                "full": full,
                "ordinary": ordinary,
                "resumed": _weights(model),
                "seen": seen,
                "saved_keys": list(state["model"]),
            },
            f"{out_dir}/rank{rank}.pt",
        )
        torch.distributed.barrier()  # no rank tears the group down while the other still talks (gloo aborts then)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_projected_training_equals_one_process_and_resumes_exactly(tmp_path):
    results = run_ranks(_worker, tmp_path, WORLD)
    reference = _reference()
    for rank, result in enumerate(results):
        assert result["seen"] == {"frozen": True, "no_full": True, "companions": True}, rank
        assert not any(key.endswith(COMPANION) for key in result["saved_keys"])
        for key, value in reference.items():
            torch.testing.assert_close(result["full"][key], result["ordinary"][key], rtol=1e-10, atol=1e-13, msg=key)
            torch.testing.assert_close(result["full"][key], value, rtol=1.3e-6, atol=1e-5, msg=key)
            assert torch.equal(result["resumed"][key], result["full"][key]), key
    for key in reference:
        assert torch.equal(results[0]["full"][key], results[1]["full"][key]), key
