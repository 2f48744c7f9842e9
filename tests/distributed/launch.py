"""Launching the recipe's multi-process test runs: one 2-rank run per selector, a 1-process reference per selector
in this process, 2-rank runs stopped at ``STOP_AT`` then resumed with ``resume=auto``, and optionally the recipe
started by other launchers (torchrun, fabric run), all started at once. Shared by the DDP and the FSDP2 recipe
tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.data.datamodule import PretrainDataModule
from lowrank_recipes.recipes.trainer import fit

from ._run_recipe import RecordRun

# Marks of every module that uses run_matrix: multi-process, and the known third-party warnings of a recipe run.
RUN_MARKS = [
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:When using the `ThroughputMonitor`, you need to define a `flops_per_batch`"),
]

# A launcher's variables in this process's environment (torchrun, SLURM) would make Lightning join that job instead
# of starting its own 2 processes: the subprocesses get an environment without them.
_LAUNCHER_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "STANDALONE_PORT",
)

SCRIPT = Path(__file__).resolve().parent / "_run_recipe.py"
ROOT = SCRIPT.parents[2]
PRETRAIN = ROOT / "recipes" / "pretrain.py"
STEPS, STOP_AT = 12, 6
TINY = [
    "model.vocab_size=384",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.max_seq_len=32",
    "data.vocab_size=384",
    "data.seq_len=32",
    "data.max_documents=20",
    "data.micro_batch_size=4",
    "data.val_sequences=8",
    "trainer.global_batch_size=8",
    "optimizer.lowrank.rank=8",
    "optimizer.refresh.update_gap=4",
    "trainer.val_every_n_steps=100",
    "trainer.log_every_n_steps=1",
    f"trainer.max_steps={STEPS}",
    "trainer.checkpoint_every_n_steps=3",
    "trainer.accelerator=cpu",
]


def _overrides(cache: Path, out: Path, selector: str, *extra: str) -> list[str]:
    return [*TINY, f"optimizer.lowrank.selector={selector}", f"data.cache_dir={cache}", f"out_dir={out}", *extra]


def _launch(command: list[str], log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    handle = log.open("w")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return proc, log


def _script(*args: str) -> list[str]:
    """The recording launcher ``_run_recipe.py`` started like ``python recipes/pretrain.py``."""
    return [sys.executable, str(SCRIPT), *args]


def console_script(name: str) -> str:
    """A console script of this environment (``torchrun``, ``fabric``): beside the interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


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


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)  # POET: no bases


def assert_ranks_match(out: Path, reference: Path, tol: float) -> dict[int, float]:
    """A recorded 2-rank run: the same losses, bases and weights on both ranks (bitwise), every step run, and within
    ``tol`` (weights, bases) and rtol/atol 1e-6 (losses) of the recorded ``reference`` run; returns its losses."""
    reference_losses, expected = _record(reference, 0)
    (losses0, rank0), (losses1, rank1) = (_record(out, r) for r in range(2))
    assert losses0 == losses1 and sorted(losses0) == list(range(1, STEPS + 1)) and rank0["global_step"] == STEPS
    for key in ("bases", "weights"):
        assert _max_diff(rank0[key], rank1[key]) == 0, key
        assert _max_diff(rank0[key], expected[key]) <= tol, (key, _max_diff(rank0[key], expected[key]))
    steps = range(1, STEPS + 1)
    torch.testing.assert_close(
        torch.tensor([losses0[s] for s in steps]),
        torch.tensor([reference_losses[s] for s in steps]),
        rtol=1e-6,
        atol=1e-6,
    )
    return losses0


def checkpoint_bases(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The ``lowrank_basis`` tensors of a single-file checkpoint's optimizer state, keyed like the module's
    parameters (``model.`` + the optimizer's parameter name), as ``RecordRun`` keys them."""
    optimizer = checkpoint["optimizer_states"][0]
    keys = {
        key: name for group in optimizer["param_groups"] for key, name in zip(group["params"], group["param_names"])
    }
    return {
        f"model.{keys[key]}": entry["lowrank_basis"]
        for key, entry in optimizer["state"].items()
        if "lowrank_basis" in entry
    }


def launcher_free_environ() -> dict[str, str]:
    """This process's environment without a launcher's variables (an earlier in-process DDP test, torchrun or SLURM
    leave them): a recipe started with it launches its own ranks instead of waiting to join another job."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }


@contextmanager
def _recipe_env(root: Path) -> Iterator[dict[str, str]]:
    """The environment of every run under ``root`` (offline, one thread, the shared tokenizer cache), applied to this
    process for the in-process runs and returned for the subprocesses."""
    cache = root / "cache"
    clean = launcher_free_environ()
    env = {
        **clean,
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "LOWRANK_RECIPES_CACHE": str(cache),
        "PYTHONPATH": str(ROOT),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "LOWRANK_RECIPES_CACHE"):
                mp.setenv(key, env[key])
            yield env
    finally:
        torch.set_num_threads(threads)


def run_in_process(root: Path, name: str, selector: str, *extra: str) -> Path:
    """One 1-process run of the recipe in this process, recorded to ``root/name/record`` (the tokenizer cache of a
    ``run_matrix`` under ``root`` is reused)."""
    with _recipe_env(root):
        run, resolved = load_run_config("default", _overrides(root / "cache", root / name, selector, *extra))
        fit(run, resolved, callbacks=[RecordRun(root / name / "record")])
    return root / name


def run_matrix(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    parallel: list[str],
    selectors: tuple[str, ...],
    reference: tuple[str, ...] = (),
    splits: dict[str, tuple[str, ...]] | None = None,
    launchers: dict[str, list[str]] | None = None,
    variants: dict[str, tuple[str, ...]] | None = None,
) -> Path:
    """Runs everything once and returns the root folder: ``<selector>-1`` (1 process, overrides ``reference`` added),
    ``<selector>-2`` (2 ranks, overrides ``parallel``), per entry of ``splits`` (default ``{"split": ()}``) a 2-rank
    run (importance, overrides ``parallel`` plus the entry's) stopped at ``STOP_AT``, then resumed, and per entry of
    ``launchers`` a 2-rank run of ``recipes/pretrain.py`` started by that command prefix (the first selector,
    overrides ``parallel``; not recorded: its TensorBoard log and checkpoints are what it leaves), and per entry of
    ``variants`` a recorded 2-rank run (the first selector, overrides ``parallel`` plus the entry's)."""
    root = tmp_path_factory.mktemp(name)
    cache = root / "cache"
    splits = {"split": ()} if splits is None else splits
    with _recipe_env(root) as env:
        # Train and cache the tokenizer once, before the processes that read it start.
        run, _ = load_run_config("default", _overrides(cache, root / "unused", "dominant"))
        PretrainDataModule(run.data).prepare_data()
        launched = [
            _launch(_script(*_overrides(cache, root / f"{s}-2", s), *parallel), root / f"{s}-2.log", env)
            for s in selectors
        ]
        launched += [
            _launch(_script(*_overrides(cache, root / tag, selectors[0]), *parallel, *more), root / f"{tag}.log", env)
            for tag, more in (variants or {}).items()
        ]
        launched += [
            _launch(
                [*prefix, str(PRETRAIN), *_overrides(cache, root / tag, selectors[0]), *parallel],
                root / f"{tag}.log",
                env,
            )
            for tag, prefix in (launchers or {}).items()
        ]
        firsts = {
            tag: _launch(
                _script(
                    "--stop-at",
                    str(STOP_AT),
                    "--record",
                    "first",
                    *_overrides(cache, root / tag, "importance"),
                    *parallel,
                    *more,
                ),
                root / f"{tag}-first.log",
                env,
            )
            for tag, more in splits.items()
        }
        try:
            for selector in selectors:  # the references, in this process, while the ranks run
                overrides = _overrides(cache, root / f"{selector}-1", selector, *reference)
                run, resolved = load_run_config("default", overrides)
                fit(run, resolved, callbacks=[RecordRun(root / f"{selector}-1" / "record")])
            for tag, more in splits.items():
                _wait(*firsts[tag])
                launched.append(
                    _launch(
                        _script(
                            "--record",
                            "second",
                            *_overrides(cache, root / tag, "importance", "resume=auto"),
                            *parallel,
                            *more,
                        ),
                        root / f"{tag}-second.log",
                        env,
                    )
                )
            for proc in launched:
                _wait(*proc)
        finally:
            for proc, _ in [*launched, *firsts.values()]:
                if proc.poll() is None:
                    proc.kill()
    return root
