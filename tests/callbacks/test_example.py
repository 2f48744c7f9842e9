"""The README's example (both callbacks on a foreign LightningModule) runs and logs the overlap tags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "foreign_module.py"


def test_foreign_module_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(tmp_path), "--max-steps", "40"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (events_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lowrank/overlap/fc1", "lowrank/overlap/fc2", "lowrank/overlap/mean", "lowrank/refresh_seconds"} <= tags
    assert "lowrank/overlap_heatmap" in acc.Tags()["images"]
