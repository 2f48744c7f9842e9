"""``model.trainable=[sfn_oproj]`` with the delta monitor on 2 DDP ranks and on 2 FSDP2 ranks (gloo, CPU, one thread
each) through the recipe: 12 low-rank steps equal one process accumulating the same global batches (losses, weights,
bases), both ranks alike; the frozen weights are bitwise those of the 1-process run and of the initialisation, and
only the o_proj weights hold bases. The monitor's ``delta/o_proj/relative_l2`` at step 12 equals a float64 computation
from the initial and the final weights, also for an FSDP2 run stopped at step 6 and resumed from its sharded
checkpoint (the start snapshot rides in the checkpoint, gathered on rank 0)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.module import LlamaPretrainModule, module_kwargs

from .launch import RUN_MARKS, TINY, _record, assert_ranks_match, run_matrix

pytestmark = RUN_MARKS
SELECT = ("model.trainable=[sfn_oproj]", "optimizer.lowrank.side=right", "delta.every_n_steps=6")  # right: fsdp2
TRAINED = ("self_attn.o_proj.", "embed_tokens.", "lm_head.", "norm.", "layernorm.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-process run, a 2-rank DDP run and a 2-rank FSDP2 run, all with o_proj and its companions trainable."""
    return run_matrix(
        tmp_path_factory,
        "trainable",
        ["trainer.devices=2", "trainer.strategy=ddp", *SELECT],
        ("dominant",),
        reference=SELECT,
        splits={"fsdp2-split": ("trainer.strategy=fsdp2",)},
        variants={"fsdp2": ("trainer.strategy=fsdp2",)},
    )


def _initial() -> dict[str, torch.Tensor]:
    run_config, _ = load_run_config("default", [*TINY, *SELECT])
    pl.seed_everything(run_config.seed)  # as the recipe's fit does before it builds the module
    return {f"model.{k}": v for k, v in LlamaPretrainModule(**module_kwargs(run_config)).model.state_dict().items()}


@pytest.mark.parametrize("run", ["dominant-2", "fsdp2"])
def test_two_ranks_equal_one_process_and_leave_frozen_weights_untouched(runs: Path, run: str) -> None:
    assert_ranks_match(runs / run, runs / "dominant-1", tol=1e-5)
    _, rank0 = _record(runs / run, 0)
    initial = _initial()
    _, reference = _record(runs / "dominant-1", 0)
    frozen = [k for k in initial if not any(part in k for part in TRAINED)]
    assert frozen and all(torch.equal(rank0["weights"][k], initial[k]) for k in frozen)
    assert all(torch.equal(rank0["weights"][k], reference["weights"][k]) for k in frozen)
    assert all(not torch.equal(rank0["weights"][k], initial[k]) for k in initial if "o_proj" in k)
    assert sorted(rank0["bases"]) == [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]


@pytest.mark.parametrize(
    ("run", "record"),
    [("dominant-1", "record"), ("dominant-2", "record"), ("fsdp2", "record")] + [("fsdp2-split", "second")],
)
def test_the_delta_monitor_measures_against_the_start_also_after_a_resume(runs: Path, run: str, record: str) -> None:
    _, final = _record(runs / run, 0, record)
    initial = _initial()
    keys = [k for k in initial if k.endswith("o_proj.weight")]
    change = sum(float((final["weights"][k].double() - initial[k].double()).pow(2).sum()) for k in keys) ** 0.5
    size = sum(float(initial[k].double().pow(2).sum()) for k in keys) ** 0.5
    events = EventAccumulator(str(runs / run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("delta/o_proj/relative_l2")}
    assert sorted(logged) == [6, 12] and change > 0
    assert logged[12] == pytest.approx(change / size, rel=1e-5)
    assert {e.step: e.value for e in events.Scalars("delta/q_proj/l2")}[12] == 0.0  # frozen
