"""The embedded default runs without `datasets` and pyarrow (they load only when a C4 or files stream opens): the
GPU check's machine lacks them, and the check must not carry their wheels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .test_pretrain import TINY

SCRIPT = """
import sys
from lowrank_recipes.recipes.pretrain import main
assert main(sys.argv[1:]) == 0
print("LOADED", sorted(name for name in ("datasets", "pyarrow") if name in sys.modules))
"""


def test_a_run_on_the_embedded_source_imports_neither_datasets_nor_pyarrow(tmp_path: Path) -> None:
    args = [*TINY, "trainer.max_steps=2", f"out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout[-2000:]
