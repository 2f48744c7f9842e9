"""bench/memory.py --quick runs every variant in a child process and writes measured beside estimated bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.quick import run_quick

VARIANTS = {"adamw-bf16", "adamw-8bit", "lowrank-8bit", "lowrank-8bit-per-layer"}


@pytest.mark.slow
def test_quick_run_writes_measured_and_estimated(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "memory.json"
    done = run_quick("memory.py", "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu" and result["meta"]["args"]["quick"] is True
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == VARIANTS
    for variant, row in rows.items():
        assert row["error"] is None, (variant, row["error"])
        assert row["estimated_bytes"] > 0 and row["measured_bytes"] > 0 and row["ratio"] > 0
        assert row["estimate"]["total"] == row["estimated_bytes"]
    assert out.with_suffix(".md").exists() and "| variant" in done.stdout
