"""Running a benchmark script's ``--quick`` mode as a user would: a fresh interpreter, the repository's script path,
the CPU, from another working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Runs ``python bench/<script> --quick --device cpu <args>`` and asserts that it exited 0 (the end of its
    output in the failure message); returns the finished process (stdout kept)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--device", "cpu", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done
