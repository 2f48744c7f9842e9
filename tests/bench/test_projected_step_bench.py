"""bench/projected_step.py --quick runs end to end and writes both variants' times and their ratios (timings are not
checked: the target is for a GPU)."""

from __future__ import annotations

import json

from tests.bench.quick import run_quick


def test_projected_step_bench_quick_writes_both_variants_and_ratios(tmp_path):
    out = tmp_path / "projected.json"
    done = run_quick("projected_step.py", "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    for variant in ("ordinary", "projected"):
        for part in ("forward", "backward_step"):
            values = row[f"{variant}_{part}_s"]
            assert len(values) == 3 and all(v > 0 for v in values)
            low, high = row[f"{variant}_{part}_quartiles_s"]
            assert low <= row[f"{variant}_{part}_median_s"] <= high
    assert row["ratio_backward_step"] > 0 and "projected / ordinary" in done.stdout
    assert out.with_suffix(".md").read_text().startswith("| model")
