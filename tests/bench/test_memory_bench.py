"""bench/memory.py --quick runs every variant in a child process and writes measured beside estimated bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.quick import run_quick

VARIANTS = {
    "adamw-fp32",
    "adamw-8bit",
    "lowrank-fp32",
    "lowrank-8bit",
    "lowrank-8bit-per-layer",
    "lowrank-8bit-per-layer-ckpt",
    "lowrank-8bit-projected",
    "poet-d4-fp32",
    "poet-d4-8bit",
}


@pytest.mark.slow
def test_quick_run_writes_measured_and_estimated(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "memory.json"
    done = run_quick("memory.py", "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu" and result["meta"]["args"]["quick"] is True
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == VARIANTS
    for variant, row in rows.items():
        assert row["child"]["error"] is None, (variant, row["child"]["error"])
        assert row["estimated_bytes"] > 0 and row["measured_bytes"] > 0
        assert row["error_fraction"] == round(row["estimated_bytes"] / row["measured_bytes"] - 1, 4)
        assert row["estimate"]["total"] == row["estimated_bytes"] and row["child"]["seconds"] > 0
        assert row["gated"] is False and row["passes"] is None  # tiny rows are far below 2 GiB
        # every phase reported, the peak the largest of them; step 1 refreshed a slice of the low-rank weights
        assert max(row["child"]["phases"].values()) <= row["measured_bytes"]
        if variant.startswith("lowrank"):
            assert row["child"]["refreshed"][0] == 14 and 0 < row["child"]["refreshed"][1] < 14
            assert row["stagger1_child"]["refreshed"] == [14, 14] and row["stagger1_measured_bytes"] > 0
        if variant.startswith("poet"):  # a merge after step 1, and state for the generators and plain parameters
            assert "step1.merge" in row["child"]["phases"] and row["estimate"]["bases"] == 0
            assert row["child"]["state_bytes"] > 0
    galore = {r["row"]: r for r in result["table_7b"]}["8-bit low-rank r1024, per-layer"]
    assert abs(galore["error_vs_published"]) <= 0.10  # GaLore's own configuration against its published 22.0 GB
    targets = result["projected_targets_7b"]  # the projected rows against their targets, both met
    assert len(targets) == 2 and all(0 < t["estimate"] <= t["target"] for t in targets)
    assert "projected-gradient target" in done.stdout
    assert out.with_suffix(".md").exists() and "| size" in done.stdout and "GaLore published" in done.stdout
