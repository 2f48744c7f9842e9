"""The pretraining recipe under FSDP2 (``trainer.strategy=fsdp2``: Lightning's ModelParallelStrategy, data parallel
over 2 gloo ranks on the CPU, one thread each, ``fully_shard`` on each decoder layer and the root), started as a
user starts it.

Launched like ``test_ddp_recipe.py``: every 2-rank run is ``python tests/distributed/_run_recipe.py ...
trainer.devices=2 trainer.strategy=fsdp2`` in a subprocess; the 1-process reference (``optimizer.lowrank.side=right``,
what fsdp2 forces) runs in this process. Global batch 8, micro-batch 4; ``update_gap=4``: refreshes before steps 1,
5 and 9 of 12.

* Per-step global mean losses, final (gathered) weights and bases of 1 process and 2 FSDP2 ranks agree to fp32
  tolerance, for the importance and the dominant selector (measured on this machine: importance bitwise; dominant
  losses within 2.4e-7, weights 2.8e-6, bases 6.9e-6, as in test_fsdp2_optimizer.py: the FSDP2 basis is stored
  contiguous while the plain one is a column slice of the SVD output).
* The weights really are row-sharded: every 2-D weight's local shard holds half of its rows on each rank.
* A 2-rank run stopped at step 6 and resumed (``resume=auto``) from its sharded ``last.ckpt/`` directory repeats the
  uninterrupted FSDP2 run's losses, weights and bases exactly (bitwise).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .launch import RUN_MARKS, STEPS, STOP_AT, _max_diff, _record, run_matrix

pytestmark = RUN_MARKS

FSDP2 = ["trainer.devices=2", "trainer.strategy=fsdp2"]
SELECTORS = ("importance", "dominant")
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per selector a 1-process and a 2-rank FSDP2 run, plus the stopped and resumed FSDP2 run (importance). The
    1-process references project on the right, as fsdp2 does."""
    return run_matrix(tmp_path_factory, "fsdp2-recipe", FSDP2, SELECTORS, reference=("optimizer.lowrank.side=right",))


@pytest.mark.parametrize("selector", SELECTORS)
def test_fsdp2_ranks_match_one_process(runs: Path, selector: str) -> None:
    single_losses, single = _record(runs / f"{selector}-1", 0)
    (losses0, rank0), (losses1, rank1) = (_record(runs / f"{selector}-2", r) for r in range(2))
    assert sorted(single_losses) == list(range(1, STEPS + 1)) and rank0["global_step"] == single["global_step"] == STEPS
    assert losses0 == losses1

    # The weights really are sharded: each rank holds half of every 2-D weight's rows.
    assert not single["local_shapes"]
    assert rank0["local_shapes"].keys() == rank1["local_shapes"].keys() == single["weights"].keys()
    for name, full in single["weights"].items():
        if full.dim() == 2:
            assert rank0["local_shapes"][name] == rank1["local_shapes"][name] == [full.shape[0] // 2, full.shape[1]]

    # Gathered weights and bases: the same on both ranks, and as one process's, to fp32 tolerance.
    assert rank0["bases"].keys() == single["bases"].keys() and len(rank0["bases"]) == 14
    for key in ("bases", "weights"):
        assert _max_diff(rank0[key], rank1[key]) == 0
        assert _max_diff(rank0[key], single[key]) <= TOL, (key, _max_diff(rank0[key], single[key]))
    steps = sorted(single_losses)
    torch.testing.assert_close(torch.tensor([losses0[s] for s in steps]),
                               torch.tensor([single_losses[s] for s in steps]), rtol=1e-6, atol=1e-6)
    assert any(((b != 0) & (b.abs() != 1)).any() for b in rank0["bases"].values())


def test_fsdp2_killed_and_resumed_run_repeats_the_uninterrupted_one(runs: Path) -> None:
    full_losses, full = _record(runs / "importance-2", 0)
    split = runs / "split"
    assert (split / "checkpoints" / "last.ckpt").is_dir()  # sharded: a directory, found by resume=auto
    first = [_record(split, r, "first") for r in range(2)]
    second = [_record(split, r, "second") for r in range(2)]
    assert all(sorted(losses) == list(range(1, STOP_AT + 1)) for losses, _ in first)
    assert all(sorted(losses) == list(range(STOP_AT + 1, STEPS + 1)) for losses, _ in second)
    assert {**first[0][0], **second[0][0]} == full_losses  # exactly: same batches, draws and optimizer state
    for _, state in second:
        assert state["global_step"] == STEPS
        for key in ("bases", "weights"):
            assert _max_diff(state[key], full[key]) == 0, (key, _max_diff(state[key], full[key]))
