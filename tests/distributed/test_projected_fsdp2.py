"""Projected gradients under FSDP2 (``fully_shard``, 2 gloo ranks) against one process on the ordinary path.

A tiny LLaMA in float32, every layer and the root ``fully_shard``-ed after ``add_companions(model, config,
freeze=False)`` (so the companions are sharded like the weights), 10 optimizer steps (refreshes at 0, 3, 6 and 9:
first bases, then importance sampling, right side as FSDP2 requires), each rank on its half of every batch. Checked:

* weights after 10 steps equal one process on the ordinary path to fp32 tolerance, identically on both ranks;
* the weights and the companions are DTensors; after a non-refresh step's backward the weights have no gradient
  (FSDP2 reduce-scattered none) and the companions have R;
* a full (unsharded) state dict round trip after step 5 (between refreshes) into a fresh sharded model and optimizer
  continues exactly as the uninterrupted run (bitwise).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lowrank.factory import build_optimizer
from lowrank.projected import add_companions, enable_projected_gradients
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss

from .spawn import run_ranks

pytestmark = [pytest.mark.multiprocess]

WORLD, STEPS, STOP = 2, 10, 5
TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, max_seq_len=16)
SETTINGS = {
    "name": "lowrank",
    "lr": 1e-2,
    "lowrank": {"rank": 4, "selector": "importance", "side": "right", "seed": 3},
    "refresh": {"update_gap": 3},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Llama(TINY)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY.vocab_size, (4, 9), generator=g) for _ in range(STEPS)]


def _reference() -> dict[str, torch.Tensor]:
    model, batches = _model(), _batches()
    optimizer = build_optimizer(model, SETTINGS)
    for step in range(STEPS):
        causal_lm_loss(model(batches[step][:, :-1]), batches[step][:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    full = StateDictOptions(full_state_dict=True, cpu_offload=False)

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _model()
        add_companions(model, SETTINGS, fsdp2=True)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = build_optimizer(model, SETTINGS)
        enable_projected_gradients(model, optimizer)
        return model, optimizer

    def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, seen: dict) -> None:
        batches = _batches()
        for step in steps:
            ids = batches[step][rank * 2 : rank * 2 + 2]
            causal_lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
            if step == 1:  # not a refresh step
                pairs = [(m.weight, m.weight_projected) for m in model.modules() if hasattr(m, "weight_projected")]
                seen["count"] = len(pairs)
                seen["dtensors"] = all(isinstance(w, DTensor) and isinstance(c, DTensor) for w, c in pairs)
                seen["no_full"] = all(w.grad is None for w, _ in pairs)
                seen["companions"] = all(c.grad is not None for _, c in pairs)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def weights(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=full).items()}

    try:
        seen: dict = {}
        model, optimizer = build()
        train(model, optimizer, range(STEPS), seen)
        uninterrupted = weights(model)

        model, optimizer = build()
        train(model, optimizer, range(STOP), {})
        saved_model = get_model_state_dict(model, options=full)
        saved_keys = list(saved_model)  # before set_model_state_dict, which fills the dict in place
        saved_optimizer = get_optimizer_state_dict(model, optimizer, options=full)
        model, optimizer = build()
        set_model_state_dict(model, saved_model, options=full)
        set_optimizer_state_dict(model, optimizer, saved_optimizer, options=full)
        train(model, optimizer, range(STOP, STEPS), {})
        result = {"full": uninterrupted, "resumed": weights(model), "seen": seen, "keys": saved_keys}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while the other still talks (gloo aborts then)
    finally:
        dist.destroy_process_group()


def test_fsdp2_projected_training_equals_one_process_and_resumes_exactly(tmp_path):
    results = run_ranks(_worker, tmp_path, WORLD)
    reference = _reference()
    for rank, result in enumerate(results):
        assert result["seen"] == {"count": 14, "dtensors": True, "no_full": True, "companions": True}, rank
        assert not any(key.endswith("weight_projected") for key in result["keys"])
        for key, value in reference.items():
            torch.testing.assert_close(result["full"][key], value, rtol=1e-5, atol=1e-6, msg=key)
            assert torch.equal(result["resumed"][key], result["full"][key]), key
    for key in reference:
        assert torch.equal(results[0]["full"][key], results[1]["full"][key]), key
