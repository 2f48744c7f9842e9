"""The pretraining recipe under FSDP2 (``trainer.strategy=fsdp2``: Lightning's ModelParallelStrategy, data parallel
over 2 gloo ranks on the CPU, one thread each, ``fully_shard`` on each decoder layer and the root), started as a
user starts it.

Launched like ``test_ddp_recipe.py``: every 2-rank run is ``python tests/distributed/_run_recipe.py ...
trainer.devices=2 trainer.strategy=fsdp2`` in a subprocess; the 1-process reference (``optimizer.lowrank.side=right``,
what fsdp2 forces) runs in this process. Global batch 8, micro-batch 4; ``update_gap=4``: refreshes before steps 1,
5 and 9 of 12.

* Per-step global mean losses, final (gathered) weights and bases of 1 process and 2 FSDP2 ranks agree to fp32
  tolerance, for the importance and the dominant selector (measured on this machine: bitwise for both, with TOL
  set to 0, since every basis is stored contiguous; before that the plain dominant basis was a column slice of the
  SVD output and the dominant run differed by up to 2.8e-6 in the weights).
* The weights really are row-sharded: every 2-D weight's local shard holds half of its rows on each rank.
* A 2-rank run stopped at step 6 and resumed (``resume=auto``) repeats the uninterrupted FSDP2 run's losses, weights
  and bases exactly (bitwise), from its sharded ``last.ckpt/`` directory (``trainer.checkpoint_format`` sharded, the
  fsdp2 default) and from its full single-file ``last.ckpt`` (``trainer.checkpoint_format=full``: gathered on rank 0
  through ``get_optimizer_state_dict(full_state_dict=True)``, restored by ``set_optimizer_state_dict`` with
  ``broadcast_from_rank0``).
* ``last.ckpt`` is a link to the newest step checkpoint (a sharded directory, or a full file), and every checkpoint
  passes the cheap completeness check of ``resume=auto`` (``recipes/checkpoints.py``).
* The full checkpoints load with ``torch.load(weights_only=True)`` and hold whole (unsharded) weights and optimizer
  state; the one of step 6 resumes in a single process (no FSDP2) and repeats the 1-process reference's steps 7-12
  (measured: bitwise).
* With ``optimizer.lowrank.projected_gradients=true`` (companions registered in the callback's ``setup``, before
  ``configure_model``'s ``fully_shard``, which shards them with the weights; R reduce-scattered as their gradient,
  G only on refresh steps) the 2-rank run equals the ordinary 2-rank run to fp32 tolerance, and a projected run
  stopped at step 6 and resumed from its sharded checkpoint repeats the uninterrupted projected run exactly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from lowrank_recipes.recipes.checkpoints import checkpoint_problem

from .launch import (
    RUN_MARKS,
    STEPS,
    STOP_AT,
    _max_diff,
    _record,
    assert_ranks_match,
    checkpoint_bases,
    run_in_process,
    run_matrix,
)

pytestmark = RUN_MARKS

FSDP2 = ["trainer.devices=2", "trainer.strategy=fsdp2"]
SELECTORS = ("importance", "dominant")
TOL = 1e-5
RIGHT = ("optimizer.lowrank.side=right",)  # what fsdp2 forces, for the 1-process runs
PROJECTED = "optimizer.lowrank.projected_gradients=true"
SPLITS = {"split": (), "split-full": ("trainer.checkpoint_format=full",)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per selector a 1-process and a 2-rank FSDP2 run, plus the stopped and resumed FSDP2 runs (importance), one
    with sharded and one with full checkpoints. The 1-process references project on the right, as fsdp2 does."""
    return run_matrix(
        tmp_path_factory,
        "fsdp2-recipe",
        FSDP2,
        SELECTORS,
        reference=RIGHT,
        splits={**SPLITS, "projected-split": (PROJECTED,)},
        variants={"projected": (PROJECTED,)},
    )


@pytest.fixture(scope="module")
def ported(runs: Path) -> Path:
    """A 1-process run (no FSDP2) resumed with ``resume=auto`` from the full FSDP2 checkpoint of step 6."""
    checkpoints = runs / "ported" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(runs / "split-full" / "checkpoints" / f"step={STOP_AT:06d}.ckpt", checkpoints / "last.ckpt")
    return run_in_process(runs, "ported", "importance", *RIGHT, "resume=auto")


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
    torch.testing.assert_close(
        torch.tensor([losses0[s] for s in steps]), torch.tensor([single_losses[s] for s in steps]), rtol=1e-6, atol=1e-6
    )
    assert any(((b != 0) & (b.abs() != 1)).any() for b in rank0["bases"].values())


@pytest.mark.parametrize("split", SPLITS)
def test_fsdp2_killed_and_resumed_run_repeats_the_uninterrupted_one(runs: Path, split: str) -> None:
    full_losses, full = _record(runs / "importance-2", 0)
    last = runs / split / "checkpoints" / "last.ckpt"
    assert last.is_dir() if split == "split" else last.is_file()  # sharded: a directory; both found by resume=auto
    first = [_record(runs / split, r, "first") for r in range(2)]
    second = [_record(runs / split, r, "second") for r in range(2)]
    assert all(sorted(losses) == list(range(1, STOP_AT + 1)) for losses, _ in first)
    assert all(sorted(losses) == list(range(STOP_AT + 1, STEPS + 1)) for losses, _ in second)
    assert {**first[0][0], **second[0][0]} == full_losses  # exactly: same batches, draws and optimizer state
    for _, state in second:
        assert state["global_step"] == STEPS
        for key in ("bases", "weights"):
            assert _max_diff(state[key], full[key]) == 0, (key, _max_diff(state[key], full[key]))


@pytest.mark.parametrize("split", SPLITS)
def test_fsdp2_last_checkpoint_links_the_newest_complete_step(runs: Path, split: str) -> None:
    directory = runs / split / "checkpoints"
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["last.ckpt", "step=000003.ckpt", "step=000006.ckpt", "step=000009.ckpt", "step=000012.ckpt"]
    assert os.readlink(directory / "last.ckpt") == "step=000012.ckpt"
    assert all(checkpoint_problem(directory / name) is None for name in names)
    assert all((directory / name).is_dir() == (split == "split") for name in names)


def test_fsdp2_full_checkpoints_are_whole_and_load_weights_only(runs: Path) -> None:
    _, single = _record(runs / "importance-1", 0)
    _, resumed = _record(runs / "split-full", 0, "second")
    directory = runs / "split-full" / "checkpoints"
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["last.ckpt", "step=000003.ckpt", "step=000006.ckpt", "step=000009.ckpt", "step=000012.ckpt"]
    for name in names:
        checkpoint = torch.load(directory / name, weights_only=True)
        weights = {k: v for k, v in checkpoint["state_dict"].items() if k in single["weights"]}
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in single["weights"].items()}
        bases = checkpoint_bases(checkpoint)
        assert {k: v.shape for k, v in bases.items()} == {k: v.shape for k, v in single["bases"].items()}
        state = checkpoint["optimizer_states"][0]["state"].values()
        # Moments are whole (m, r): rows of both shards, not the (m / 2, r) local shard.
        assert {tuple(e["exp_avg"].shape) for e in state if "lowrank_basis" in e} == {(32, 8), (64, 8)}
    last = torch.load(directory / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS
    weights = {k: v for k, v in last["state_dict"].items() if k in resumed["weights"]}
    assert _max_diff(weights, resumed["weights"]) == 0 and _max_diff(checkpoint_bases(last), resumed["bases"]) == 0


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the copied checkpoint
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # it was saved under split-full/
def test_full_fsdp2_checkpoint_resumes_in_one_process(runs: Path, ported: Path) -> None:
    single_losses, single = _record(runs / "importance-1", 0)
    losses, state = _record(ported, 0)
    assert sorted(losses) == list(range(STOP_AT + 1, STEPS + 1)) and state["global_step"] == STEPS
    assert not state["local_shapes"]  # really one process, plain tensors
    torch.testing.assert_close(
        torch.tensor([losses[s] for s in sorted(losses)]),
        torch.tensor([single_losses[s] for s in sorted(losses)]),
        rtol=1e-6,
        atol=1e-6,
    )
    for key in ("bases", "weights"):
        assert _max_diff(state[key], single[key]) <= TOL, (key, _max_diff(state[key], single[key]))


def test_projected_gradients_on_fsdp2_ranks_match_the_ordinary_run_and_resume_exactly(runs: Path) -> None:
    losses0 = assert_ranks_match(runs / "projected", runs / "importance-2", tol=TOL)
    _, rank0 = _record(runs / "projected", 0)
    split = runs / "projected-split"
    first, second = _record(split, 0, "first"), _record(split, 0, "second")
    assert {**first[0], **second[0]} == losses0  # exactly: same batches, draws and optimizer state
    for key in ("bases", "weights"):
        assert _max_diff(second[1][key], rank0[key]) == 0, key
