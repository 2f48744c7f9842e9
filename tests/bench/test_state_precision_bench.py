"""bench/state_precision.py --quick runs end to end and writes every row and column (timings are not checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.quick import run_quick

VARIANTS = {f"{name}-{precision}" for name in ("lowrank", "adamw") for precision in ("fp32", "bf16", "8bit")}
COLUMNS = {
    "variant",
    "name",
    "state_precision",
    "step_median_s",
    "step_ratio",
    "state_bytes",
    "state_ratio",
    "estimated_state_bytes",
    "train_peak_bytes",
    "train_baseline_bytes",
    "train_increase_bytes",
    "train_step_median_s",
    "train_final_loss",
}
META = {"device", "torch", "cpu_count", "threads", "date", "args"}


@pytest.mark.slow
def test_quick_run_writes_every_row_and_column(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "state_precision.json"
    done = run_quick("state_precision.py", "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert META <= set(result["meta"]) and result["meta"]["device"] == "cpu"
    assert result["meta"]["args"]["quick"] is True
    assert set(result["columns"]) == COLUMNS
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == VARIANTS and len(result["rows"]) == len(VARIANTS)
    for variant, row in rows.items():
        missing = sorted(column for column in COLUMNS if row.get(column) is None)
        assert not missing, f"{variant}: no value for {missing} (child error: {row.get('train_error')})"
        assert row["train_error"] is None
        assert (row["name"], row["state_precision"]) == tuple(variant.split("-"))
    for family in ("lowrank", "adamw"):
        assert rows[f"{family}-fp32"]["step_ratio"] == 1.0 and rows[f"{family}-fp32"]["state_ratio"] == 1.0
    assert {t["target"] for t in result["targets"]} == {"8-bit low-rank step time", "8-bit low-rank state bytes"}
    assert all({"measured", "limit", "ok"} <= set(t) for t in result["targets"])
    for header in ("| variant", "| target"):
        assert header in done.stdout
