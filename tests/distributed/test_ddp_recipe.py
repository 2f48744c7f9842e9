"""The pretraining recipe under DDP (2 gloo ranks on the CPU, one thread each), started as a user starts it.

Every 2-rank run is ``python tests/distributed/_run_recipe.py ... trainer.devices=2 trainer.strategy=ddp`` in a
subprocess (the recipe's ``fit`` plus a recording callback); Lightning's DDP launcher re-executes that script for
rank 1. The 1-process reference runs in this process with the same callback. Global batch 8, micro-batch 4: the
single process accumulates 2 micro-batches per step, each rank takes one. ``update_gap=4``: refreshes before steps
1, 5 and 9, so 12 steps cross three of them.

* Per-step global mean losses, final weights and bases of 1 process and 2 ranks agree to fp32 tolerance, for the
  dominant and the importance selector (measured on this machine: bitwise equal; DDP's pre-divided all-reduce of
  two gradients g1/2 + g2/2 is what accumulating loss/2 over two micro-batches computes). docs/reference.md allows drift
  after the second refresh; none was seen, so the comparison stays strict over all 12 steps.
* Every rank ends with bitwise identical bases and weights.
* A 2-rank run stopped at step 6 (after the refresh at step 4, before the one at step 8) and resumed from its
  ``last.ckpt`` (``resume=auto``) repeats the uninterrupted 2-rank run's losses, bases and weights exactly.
* Every checkpoint of the 2-rank runs loads with ``torch.load(weights_only=True)``.
* With ``optimizer.refresh.split_across_ranks=true`` (each rank computes half of a refresh's SVDs and broadcasts the
  bases), the 2-rank dominant run repeats the unsplit 2-rank run bitwise (losses, weights, bases; identical on both
  ranks) and so equals the 1-process reference to fp32 tolerance.
* The recipe's own entry point started by the launchers docs/distributed.md shows, ``torchrun --standalone
  --nproc_per_node 2 recipes/pretrain.py ...`` and ``fabric run --accelerator cpu --devices 2 --main-port P
  recipes/pretrain.py ...`` (the Trainer joins the launcher's 2 processes instead of spawning its own), logs the same
  per-step rank-0 ``train/loss`` as the spawn-launched 2-rank run (measured: bitwise), and its final weights and bases
  (read from its ``last.ckpt``) equal the 1-process reference's to fp32 tolerance (measured: bitwise).
* With ``optimizer.lowrank.projected_gradients=true`` (R = dy^T (x B) or (dy B)^T x in backward, all-reduced by DDP
  as the companions' gradients; G only on refresh steps, averaged by the optimizer) the 2-rank dominant run equals
  the ordinary 2-rank run to fp32 tolerance, identically on both ranks; a projected 2-rank run stopped at step 6 and
  resumed (importance) equals the uninterrupted ordinary one to fp32 tolerance, and its checkpoints hold no companion.

All runs start at once in one module fixture (the processes mostly import and wait; about a minute on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .launch import (
    RUN_MARKS,
    STEPS,
    STOP_AT,
    _max_diff,
    _record,
    assert_ranks_match,
    checkpoint_bases,
    console_script,
    run_matrix,
)
from .spawn import free_port

pytestmark = RUN_MARKS
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
PROJECTED = "optimizer.lowrank.projected_gradients=true"
SELECTORS = ("dominant", "importance")
LAUNCHERS = ("torchrun", "fabric-run")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per selector a 1-process and a 2-rank run, plus the stopped and resumed 2-rank run (importance) and
    ``recipes/pretrain.py`` (dominant) started by torchrun and by fabric run, and a 2-rank run (dominant) that splits
    the SVDs across the ranks."""
    launchers = {
        "torchrun": [console_script("torchrun"), "--standalone", "--nproc_per_node", "2"],
        "fabric-run": [
            console_script("fabric"),
            "run",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--main-port",
            str(free_port()),
        ],
    }
    return run_matrix(
        tmp_path_factory,
        "ddp-recipe",
        DDP,
        SELECTORS,
        launchers=launchers,
        splits={"split": (), "projected-split": (PROJECTED,)},
        variants={"split-svd": ("optimizer.refresh.split_across_ranks=true",), "projected": (PROJECTED,)},
    )


def _logged_losses(out: Path) -> dict[int, float]:
    """``train/loss`` from a run's TensorBoard log, by 0-based step (rank 0's loss: logged without sync)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars("train/loss")}


@pytest.mark.parametrize("selector", SELECTORS)
def test_two_ranks_match_one_process(runs: Path, selector: str) -> None:
    single_losses, single = _record(runs / f"{selector}-1", 0)
    (losses0, rank0), (losses1, rank1) = (_record(runs / f"{selector}-2", r) for r in range(2))
    assert sorted(single_losses) == list(range(1, STEPS + 1)) and rank0["global_step"] == single["global_step"] == STEPS
    assert losses0 == losses1  # the all-reduced loss is the same number on both ranks

    # Every rank holds the same bases and weights, bit for bit.
    assert rank0["bases"].keys() == rank1["bases"].keys() and len(rank0["bases"]) == 14
    assert all(torch.equal(rank0["bases"][k], rank1["bases"][k]) for k in rank0["bases"])
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])

    # And the same as one process accumulating the same global batches, to fp32 tolerance (seen: bitwise).
    steps = sorted(single_losses)
    torch.testing.assert_close(
        torch.tensor([losses0[s] for s in steps]), torch.tensor([single_losses[s] for s in steps]), rtol=1e-6, atol=1e-6
    )
    for key in ("bases", "weights"):
        assert _max_diff(rank0[key], single[key]) <= 1e-6, (key, _max_diff(rank0[key], single[key]))
    # The bases really were refreshed from gradients (not the placeholder's coordinate axes).
    assert any(((b != 0) & (b.abs() != 1)).any() for b in rank0["bases"].values())


def test_killed_and_resumed_two_rank_run_repeats_the_uninterrupted_one(runs: Path) -> None:
    full_losses, full = _record(runs / "importance-2", 0)
    split = runs / "split"
    first = [_record(split, r, "first") for r in range(2)]
    second = [_record(split, r, "second") for r in range(2)]
    assert all(sorted(losses) == list(range(1, STOP_AT + 1)) for losses, _ in first)
    assert all(sorted(losses) == list(range(STOP_AT + 1, STEPS + 1)) for losses, _ in second)
    assert {**first[0][0], **second[0][0]} == full_losses  # exactly: same batches, draws and optimizer state
    for _, state in second:
        assert state["global_step"] == STEPS
        assert all(torch.equal(state["bases"][k], full["bases"][k]) for k in full["bases"])
        assert all(torch.equal(state["weights"][k], full["weights"][k]) for k in full["weights"])


def test_ddp_checkpoints_load_weights_only(runs: Path) -> None:
    names = sorted(p.name for p in (runs / "split" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=000003.ckpt", "step=000006.ckpt", "step=000009.ckpt", "step=000012.ckpt"]
    for directory in (runs / "split" / "checkpoints", runs / "dominant-2" / "checkpoints"):
        for path in sorted(directory.iterdir()):
            checkpoint = torch.load(path, weights_only=True)
            state = checkpoint["optimizer_states"][0]["state"]
            assert any("lowrank_basis" in entry for entry in state.values()), path
    last = torch.load(runs / "importance-2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS
    _, rank0 = _record(runs / "importance-2", 0)
    weights = {k: v for k, v in last["state_dict"].items() if k in rank0["weights"]}
    assert all(torch.equal(weights[k], rank0["weights"][k]) for k in rank0["weights"])


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_torchrun_and_fabric_run_start_the_recipe_on_two_ranks(runs: Path, launcher: str) -> None:
    log = (runs / f"{launcher}.log").read_text()
    assert log.count("Initializing distributed: GLOBAL_RANK") == 2, log[-4000:]  # 2 ranks, not 2 spawning 2 each
    assert "MEMBER: 2/2" in log
    losses = _logged_losses(runs / launcher)
    assert sorted(losses) == list(range(STEPS)) and losses == _logged_losses(runs / "dominant-2")

    _, single = _record(runs / "dominant-1", 0)
    last = torch.load(runs / launcher / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS
    weights = {k: v for k, v in last["state_dict"].items() if k in single["weights"]}
    assert _max_diff(weights, single["weights"]) <= 1e-6, _max_diff(weights, single["weights"])
    assert _max_diff(checkpoint_bases(last), single["bases"]) <= 1e-6


def test_split_svd_run_matches_the_unsplit_run(runs: Path) -> None:
    single_losses, single = _record(runs / "dominant-1", 0)
    unsplit_losses, unsplit = _record(runs / "dominant-2", 0)
    (losses0, rank0), (losses1, rank1) = (_record(runs / "split-svd", r) for r in range(2))
    assert losses0 == losses1 == unsplit_losses and sorted(losses0) == list(range(1, STEPS + 1))
    assert rank0["global_step"] == STEPS
    for key in ("bases", "weights"):
        assert _max_diff(rank0[key], rank1[key]) == 0 and _max_diff(rank0[key], unsplit[key]) == 0, key
        assert _max_diff(rank0[key], single[key]) <= 1e-5, (key, _max_diff(rank0[key], single[key]))
    torch.testing.assert_close(
        torch.tensor([losses0[s] for s in range(1, STEPS + 1)]),
        torch.tensor([single_losses[s] for s in range(1, STEPS + 1)]),
        rtol=1e-6,
        atol=1e-6,
    )


def test_projected_gradients_on_two_ranks_match_the_ordinary_run(runs: Path) -> None:
    assert_ranks_match(runs / "projected", runs / "dominant-2", tol=1e-5)


def test_a_stopped_projected_two_rank_run_resumes_like_the_uninterrupted_ordinary_one(runs: Path) -> None:
    full_losses, full = _record(runs / "importance-2", 0)
    split = runs / "projected-split"
    losses = {**_record(split, 0, "first")[0], **_record(split, 0, "second")[0]}
    assert sorted(losses) == list(range(1, STEPS + 1))
    torch.testing.assert_close(
        torch.tensor([losses[s] for s in sorted(losses)]),
        torch.tensor([full_losses[s] for s in sorted(losses)]),
        rtol=1e-6,
        atol=1e-6,
    )
    _, resumed = _record(split, 0, "second")
    for key in ("bases", "weights"):
        assert _max_diff(resumed[key], full[key]) <= 1e-5, (key, _max_diff(resumed[key], full[key]))
    for path in sorted((split / "checkpoints").iterdir()):
        checkpoint = torch.load(path, weights_only=True)
        assert not any(k.endswith("weight_projected") for k in checkpoint["state_dict"]), path
