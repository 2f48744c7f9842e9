"""bench/sfn_study.py ``--quick`` end to end (a base run, four continued runs, delta, merge, destruction), then a
second invocation that reuses every run and trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.quick import run_quick

TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.slow
def test_quick_study_reports_every_table_and_reuses_its_runs(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    run_quick("sfn_study.py", "--work-dir", str(work), "--out-dir", str(out), cwd=tmp_path)
    result = json.loads((out / "sfn.json").read_text())
    assert set(result["losses"]) == {"base", "adamw", "galore", "sara", "adamw_oproj"}
    for run, types in result["delta"].items():
        assert list(types) == TYPES
        assert sum(t["share"] for t in types.values()) == pytest.approx(1.0), run
    # training only o_proj (and companions) moves only o_proj among the block matrices
    assert result["delta"]["adamw_oproj"]["o_proj"]["share"] == 1.0
    assert all(result["delta"]["adamw_oproj"][k]["relative_l2"] == 0.0 for k in TYPES if k != "o_proj")
    assert list(result["merge"]) == TYPES and list(result["destruction"]) == TYPES
    assert list(result["removed_layers"]) == ["0", "1"]
    assert all(s > 0 for s in result["seconds"].values())
    assert (out / "sfn_shares.png").stat().st_size > 0 and "## Destruction of A" in (out / "sfn.md").read_text()
    again = run_quick("sfn_study.py", "--work-dir", str(work), "--out-dir", str(out), cwd=tmp_path)
    second = json.loads((out / "sfn.json").read_text())
    assert all(s == 0 for s in second["seconds"].values()), again.stdout[-500:]
    assert second["losses"] == result["losses"]
