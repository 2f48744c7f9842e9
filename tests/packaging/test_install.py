"""What gets installed can live beside a user's own project: import names that do not collide, an optimizer that
imports torch alone, the configs as package data, the console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "foreign_module.py"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_optimizer_imports_torch_alone(tmp_path: Path) -> None:
    heavy = ("lightning", "lightning.pytorch", "datasets", "torchdata", "matplotlib", "omegaconf")
    done = _python(f"import sys, lowrank; print(sorted(m for m in {heavy!r} if m in sys.modules))", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _user_project(root: Path) -> Path:
    """A user's Lightning project with its own ``callbacks.py`` and ``recipes/`` package (common names)."""
    root.mkdir(parents=True)
    (root / "callbacks.py").write_text("MINE = 'the user callbacks module'\n")
    (root / "recipes").mkdir()
    (root / "recipes" / "__init__.py").write_text("MINE = 'the user recipes package'\n")
    shutil.copy(EXAMPLE, root / "train.py")
    return root


def test_a_user_project_with_its_own_callbacks_and_recipes_uses_ours(tmp_path: Path) -> None:
    project = _user_project(tmp_path / "project")
    code = (
        "import callbacks, recipes\n"
        "from lowrank_recipes.callbacks import SubspaceOverlapMonitor, SubspaceResampler\n"
        "from lowrank_recipes.recipes.config import available_configs\n"
        "print(callbacks.MINE, '|', recipes.MINE, '|', SubspaceResampler.__module__, '|', available_configs())\n"
    )
    done = _python(code, project)
    assert done.returncode == 0, done.stderr
    mine_cb, mine_rc, module, configs = done.stdout.strip().split(" | ")
    assert (mine_cb, mine_rc) == ("the user callbacks module", "the user recipes package")
    assert module == "lowrank_recipes.callbacks.resampler"
    assert "default" in configs and "c4_60m" in configs  # package data, found without the repository's path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "train.py", "--out", str(tmp_path / "logs"), "--max-steps", "20"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "final metrics" in run.stdout and list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def _console_script() -> Path:
    script = Path(sysconfig.get_path("scripts")) / "lowrank-pretrain"
    found = script if script.exists() else shutil.which("lowrank-pretrain")
    if found is None:
        pytest.fail("the lowrank-pretrain console script is not installed (pip install -e '.[recipe]')")
    return Path(found)


def test_console_script_runs_the_recipe_entry(tmp_path: Path) -> None:
    script = _console_script()
    done = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "key=value overrides" in done.stdout, done.stderr
    bad = subprocess.run(
        [str(script), "trainer.max_stepz=3", f"out_dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown key trainer.max_stepz")
    assert not (tmp_path / "out").exists()
