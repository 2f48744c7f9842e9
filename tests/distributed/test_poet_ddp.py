"""POET under DDP (2 gloo ranks on the CPU, one thread each), through the recipe: 12 optimizer steps with merges after
steps 5 and 10 equal one process accumulating the same global batches, on both ranks alike; a 2-rank run stopped at
step 6 (between the merges) and resumed repeats the uninterrupted one exactly; checkpoints load weights-only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowrank.poet_rotation import draw_permutation

from .launch import RUN_MARKS, STEPS, STOP_AT, _record, assert_ranks_match, run_matrix

pytestmark = RUN_MARKS
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
POET = ["optimizer.name=poet", "optimizer.poet.block_size=8", "optimizer.poet.merge_every=5", "optimizer.poet.lr=0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-process and a 2-rank POET run, and a 2-rank run stopped at step 6, then resumed."""
    return run_matrix(tmp_path_factory, "poet-ddp", [*DDP, *POET], ("dominant",), reference=tuple(POET))


def test_two_ranks_equal_one_process_across_merges(runs: Path) -> None:
    assert_ranks_match(runs / "dominant-2", runs / "dominant-1", tol=1e-6)
    _, rank0 = _record(runs / "dominant-2", 0)
    # the last merge (after step 10) drew the permutations of (run seed 0, step 10, name) on every rank
    name = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(rank0["weights"][f"model.{name[:-7]}.perm_in"], draw_permutation(0, 10, f"{name}.in", 32))
    assert rank0["weights"][f"model.{name[:-7]}.q_out"].abs().max() > 0  # trained after that merge


def test_a_stopped_two_rank_run_resumes_exactly(runs: Path) -> None:
    full_losses, full = _record(runs / "dominant-2", 0)
    first = [_record(runs / "split", r, "first") for r in range(2)]
    second = [_record(runs / "split", r, "second") for r in range(2)]
    assert all(sorted(losses) == list(range(1, STOP_AT + 1)) for losses, _ in first)
    assert {**first[0][0], **second[0][0]} == full_losses
    for _, state in second:
        assert state["global_step"] == STEPS
        assert all(torch.equal(state["weights"][k], full["weights"][k]) for k in full["weights"])
    for path in sorted((runs / "split" / "checkpoints").iterdir()):
        checkpoint = torch.load(path, weights_only=True)
        assert any(k.endswith(".weight0") for k in checkpoint["state_dict"]), path
