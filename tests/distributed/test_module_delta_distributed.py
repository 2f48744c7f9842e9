"""ModuleDeltaMonitor on 2 gloo ranks (CPU, one thread each), against the independent float64 computation of
tests/callbacks/test_module_delta_monitor.py on the whole weights:

* DDP through Lightning (each rank started here with the launcher variables set, so Lightning joins instead of
  launching): rank 0 logs the values of the start and end weights; rank 1 holds no snapshot and logs nothing;
* FSDP2 (``fully_shard`` on every layer, the head and the root, by hand, no Trainer): every rank snapshots its
  shards, the per-shard statistics are all-reduced, rank 0 logs the whole-model values; the callback's
  ``state_dict()`` gathers the whole start snapshot onto rank 0, and a fresh monitor loading it (as a resumed run does
  on every rank) takes its own shards back and computes the same values.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from .spawn import run_ranks

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]
WORLD = 2


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import lightning.pytorch as pl

    from lowrank_recipes.callbacks.module_delta import ModuleDeltaMonitor
    from tests.callbacks.helpers import RecordingLogger
    from tests.callbacks.test_module_delta_monitor import ToyLM, loader, weights

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    module, logger = ToyLM(), RecordingLogger()
    start = weights(module)
    monitor = ModuleDeltaMonitor(every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_steps=4,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, loader(batches=8))
    result = {"start": start, "end": weights(module), "calls": logger.calls, "snapshot": monitor._snapshot}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    trainer.strategy.barrier()


def test_ddp_rank_zero_logs_the_one_process_values(tmp_path: Path) -> None:
    from tests.callbacks.test_module_delta_monitor import expected_tags

    results = run_ranks(_ddp_worker, tmp_path, WORLD)
    zero, one = results
    for name in zero["end"]:
        assert torch.equal(zero["end"][name], one["end"][name]), name  # replicated
    logged = {}
    for step, metrics in zero["calls"]:
        if any(k.startswith("delta") for k in metrics):
            logged[step] = {k: v for k, v in metrics.items() if k.startswith("delta")}
    assert sorted(logged) == [2, 4]
    assert logged[4] == pytest.approx(expected_tags(zero["start"], zero["end"]), rel=1e-9)
    assert set(zero["snapshot"]) == set(zero["start"]) and one["snapshot"] == {}
    assert not [m for _, m in one["calls"] if any(k.startswith("delta") for k in m)]


def _fsdp2_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lowrank_recipes.callbacks.module_delta import ModuleDeltaMonitor
    from tests.callbacks.helpers import RecordingLogger
    from tests.callbacks.test_module_delta_monitor import ToyLM, loader

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        module = ToyLM()
        for part in [*module.model.layers, module.model.head, module]:  # the LightningModule itself is the root
            fully_shard(part, mesh=mesh)

        def whole() -> dict[str, torch.Tensor]:
            return {n: p.full_tensor().detach().clone() for n, p in module.named_parameters() if p.ndim >= 2}

        start = whole()
        logger = RecordingLogger()
        trainer = SimpleNamespace(global_step=0, global_rank=rank, loggers=[logger])
        monitor = ModuleDeltaMonitor(every_n_steps=2, bins=10)
        monitor.setup(trainer, module, "fit")
        monitor.on_train_start(trainer, module)
        local_elements = sum(t.numel() for t in monitor._snapshot.values())
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.02)
        for step, (x, y) in enumerate(loader(batches=3), start=1):
            half = slice(2 * rank, 2 * rank + 2)
            torch.nn.functional.mse_loss(module(x[half]), y[half]).backward()
            optimizer.step()
            optimizer.zero_grad()
            trainer.global_step = step
            monitor.on_train_batch_end(trainer, module, None, None, step - 1)
            if step == 2:
                at_two = whole()
        end = whole()
        state = monitor.state_dict()  # a collective: gathers the start snapshot onto rank 0
        path = Path(out_dir) / "monitor_state.pt"
        if rank == 0:
            torch.save(state, path)
        dist.barrier()
        resumed = ModuleDeltaMonitor(every_n_steps=2, bins=10)
        resumed.load_state_dict(torch.load(path, weights_only=True))  # every rank loads rank 0's state
        resumed.prepare(module, rank)
        again = resumed.metrics(resumed.compute(module))
        result = {
            "start": start,
            "at_two": at_two,
            "end": end,
            "calls": logger.calls,
            "state": state,
            "again": again,
            "local_elements": local_elements,
            "dtensors": all(isinstance(p, DTensor) for p in module.parameters()),
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_sum_to_the_whole_and_the_snapshot_is_gathered(tmp_path: Path) -> None:
    from tests.callbacks.test_module_delta_monitor import expected_tags

    zero, one = run_ranks(_fsdp2_worker, tmp_path, WORLD)
    assert zero["dtensors"] and one["dtensors"]
    total = sum(t.numel() for t in zero["start"].values())
    assert zero["local_elements"] + one["local_elements"] == total  # each rank holds its own shards only
    assert 0 < zero["local_elements"] < total
    logged = {step: m for step, m in zero["calls"] if any(k.startswith("delta") for k in m)}
    assert sorted(logged) == [2]
    assert not one["calls"]
    assert logged[2] == pytest.approx(expected_tags(zero["start"], zero["at_two"]), rel=1e-9)
    # after step 3, from the resumed monitor: the same start, every rank gets the reduced values
    expected = expected_tags(zero["start"], zero["end"])
    assert zero["again"] == pytest.approx(expected, rel=1e-9)
    assert one["again"] == pytest.approx(expected, rel=1e-9)
    snapshot = zero["state"]["snapshot"]
    assert set(snapshot) == set(zero["start"]) and one["state"]["snapshot"] == {}
    for name, tensor in zero["start"].items():
        assert torch.equal(snapshot[name], tensor), name
