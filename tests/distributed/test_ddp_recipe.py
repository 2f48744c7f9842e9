"""The pretraining recipe under DDP (2 gloo ranks on the CPU, one thread each), started as a user starts it.

Every 2-rank run is ``python tests/distributed/_run_recipe.py ... trainer.devices=2 trainer.strategy=ddp`` in a
subprocess (the recipe's ``fit`` plus a recording callback); Lightning's DDP launcher re-executes that script for
rank 1. The 1-process reference runs in this process with the same callback. Global batch 8, micro-batch 4: the
single process accumulates 2 micro-batches per step, each rank takes one. ``update_gap=4``: refreshes before steps
1, 5 and 9, so 12 steps cross three of them.

* Per-step global mean losses, final weights and bases of 1 process and 2 ranks agree to fp32 tolerance, for the
  dominant and the importance selector (measured on this machine: bitwise equal; DDP's pre-divided all-reduce of
  two gradients g1/2 + g2/2 is what accumulating loss/2 over two micro-batches computes). DESIGN.md allows drift
  after the second refresh; none was seen, so the comparison stays strict over all 12 steps.
* Every rank ends with bitwise identical bases and weights.
* A 2-rank run stopped at step 6 (after the refresh at step 4, before the one at step 8) and resumed from its
  ``last.ckpt`` (``resume=auto``) repeats the uninterrupted 2-rank run's losses, bases and weights exactly.
* Every checkpoint of the 2-rank runs loads with ``torch.load(weights_only=True)``.

All runs start at once in one module fixture (the processes mostly import and wait; about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.config import load_run_config
from recipes.data.datamodule import PretrainDataModule
from recipes.trainer import fit

from ._run_recipe import RecordRun

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:When using the `ThroughputMonitor`, you need to define a `flops_per_batch`"),
]
# A launcher's variables in this process's environment (torchrun, SLURM) would make Lightning join that job instead
# of starting its own 2 processes: the subprocesses get an environment without them.
_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                       "LOCAL_WORLD_SIZE", "STANDALONE_PORT")

SCRIPT = Path(__file__).resolve().parent / "_run_recipe.py"
ROOT = SCRIPT.parents[2]
STEPS, STOP_AT = 12, 6
TINY = [
    "model.vocab_size=384", "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=2",
    "model.num_layers=2", "model.max_seq_len=32", "data.vocab_size=384", "data.seq_len=32", "data.max_documents=20",
    "data.micro_batch_size=4", "data.val_sequences=8", "trainer.global_batch_size=8", "optimizer.lowrank.rank=8",
    "optimizer.lowrank.update_gap=4", "trainer.val_every_n_steps=100", "trainer.log_every_n_steps=1",
    f"trainer.max_steps={STEPS}", "trainer.checkpoint_every_n_steps=3", "trainer.accelerator=cpu",
]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
SELECTORS = ("dominant", "importance")


def _overrides(cache: Path, out: Path, selector: str, *extra: str) -> list[str]:
    return [*TINY, f"optimizer.lowrank.selector={selector}", f"data.cache_dir={cache}", f"out_dir={out}", *extra]


def _launch(args: list[str], log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    handle = log.open("w")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, stdout=handle,
                            stderr=subprocess.STDOUT)
    handle.close()
    return proc, log


def _wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    assert code == 0, f"{' '.join(map(str, proc.args))} exited with {code}:\n{log.read_text()[-4000:]}"


def _record(out: Path, rank: int, folder: str = "record") -> tuple[dict[int, float], dict]:
    losses = {int(k): v for k, v in json.loads((out / folder / f"losses-rank{rank}.json").read_text()).items()}
    return losses, torch.load(out / folder / f"rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs everything once: per selector a 1-process and a 2-rank run, plus the stopped and resumed 2-rank run
    (importance selector). Returns the root folder: <selector>-1, <selector>-2, split."""
    root = tmp_path_factory.mktemp("ddp-recipe")
    cache = root / "cache"
    clean = {k: v for k, v in os.environ.items()
             if k not in _LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env = {**clean, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "LOWRANK_RECIPES_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "LOWRANK_RECIPES_CACHE"):
            mp.setenv(key, env[key])
        # Train and cache the tokenizer once, before the processes that read it start.
        run, _ = load_run_config("default", _overrides(cache, root / "unused", "dominant"))
        PretrainDataModule(run.data).prepare_data()
        launched = [_launch([*_overrides(cache, root / f"{s}-2", s), *DDP], root / f"{s}-2.log", env)
                    for s in SELECTORS]
        first = _launch(["--stop-at", str(STOP_AT), "--record", "first",
                         *_overrides(cache, root / "split", "importance"), *DDP], root / "split-first.log", env)
        try:
            for selector in SELECTORS:  # the references, in this process, while the ranks run
                run, resolved = load_run_config("default", _overrides(cache, root / f"{selector}-1", selector))
                fit(run, resolved, callbacks=[RecordRun(root / f"{selector}-1" / "record")])
            _wait(*first)
            second = _launch(["--record", "second", *_overrides(cache, root / "split", "importance", "resume=auto"),
                              *DDP], root / "split-second.log", env)
            for proc in [*launched, second]:
                _wait(*proc)
        finally:
            torch.set_num_threads(threads)
            for proc, _ in [*launched, first]:
                if proc.poll() is None:
                    proc.kill()
    return root


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


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
    torch.testing.assert_close(torch.tensor([losses0[s] for s in steps]),
                               torch.tensor([single_losses[s] for s in steps]), rtol=1e-6, atol=1e-6)
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
