"""bench/gpu_check.sh --dry-run: every section of the prepared GPU check runs on the CPU with tiny sizes and writes
its results and its line in summary.txt (marked slow: four benchmark runs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    summary = (out / "summary.txt").read_text().splitlines()
    statuses = {line.split()[0]: line.split()[2] for line in summary}
    assert statuses == {"env": "0", "throughput": "0", "step": "0", "memory": "0"}, summary
    for name in ("throughput", "optimizer_step", "memory"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["meta"]["device"] == "cpu" and (out / f"{name}.md").exists(), name
    assert {row["variant"] for row in json.loads((out / "throughput.json").read_text())["rows"]} == {
        "adamw",
        "randomized-importance-stagger4-projected",
    }
