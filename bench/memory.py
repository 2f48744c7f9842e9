"""Training-memory benchmark: the measured peak of a few real training steps of the recipe's model beside
``lowrank.memory.estimate_memory``, one row per fresh process, and the estimator's 7B table beside GaLore's figures.

Rows (``bench/_memory_rows.py``): 60M and 130M in fp32, 350M and 1B in bf16 ("bf16-true": weights, gradients and
torch AdamW's moments in bf16), micro-batch 1 x sequence 256, ranks 128 / 256 / 256 / 512; variants AdamW with fp32
states (moments in the parameter dtype), AdamW with 8-bit states, low-rank with fp32 and 8-bit states, low-rank 8-bit
with per-layer updates, low-rank 8-bit with projected gradients (measured from step 1 on: step 0 forms every full
gradient for the first bases), and at 1B per-layer updates with activation checkpointing. Refreshes use the exact
SVD (importance sampling) up to 350M and the randomized one at 1B.

Each row is a child process (this script with ``--child``) that builds the model in its dtype, runs ``--steps``
steps (step 0 gives every low-rank weight its first basis, step 1 refreshes one slice) and reports its peak above
the memory before the model was built: resident memory on a CPU, the allocator's peak on a GPU. On a CPU the child
first runs two steps of a tiny model with the same optimizer, so that torch's one-time costs (kernel libraries,
thread pools) fall before the baseline, and runs with glibc's mmap threshold fixed at 64 KiB, so that freed buffers
go back to the system and the resident peak follows the live tensors. Low-rank rows refresh with stagger = the
number of layers (a refresh step re-selects one layer's matrices); each is run a second time with stagger 1 (every
basis at once: the step's refresh records hold every old basis until it ends) and that peak is printed beside it.

    python bench/memory.py --quick                 # tiny shapes, seconds (a test runs this)
    python bench/memory.py                         # every 60M-1B row (about 50 minutes on 2 cores)
    python bench/memory.py --sizes 60m 130m        # some sizes
    python bench/memory.py --table-7b              # the estimator's 7B table only, no training

The gate: rows whose measured peak is above ``--gate-above`` (2 GiB) must be within 10% of the estimate; the JSON
says which rows pass, and the script exits 1 when one does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lowrank.memory import estimate_memory

from _common import markdown_table, mib, pick_device, run_metadata
from _memory_7b import table_7b, targets_markdown
from _memory_rows import DEFAULT_ROWS, QUICK_ROWS, SIZES, VARIANTS, shapes, stagger_of

GIB = 2**30
TOLERANCE = 0.10
# glibc: every allocation of 64 KiB or more is its own mapping, returned to the system when freed (no dynamic
# threshold), so the resident peak is the peak of live memory rather than of the heap's high-water mark.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"}


def run_child(size: str, variant: str, stagger: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one row in a fresh interpreter; its result, or ``error`` with the end of its output."""
    command = [sys.executable, __file__, "--child", size, variant, str(stagger), "--steps", str(args.steps)]
    command += ["--device", args.device]
    env = {**os.environ, **CHILD_ENV}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"measured_bytes": None, "error": f"timed out after {args.child_timeout:.0f} s"}
    seconds = round(time.perf_counter() - start, 1)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "error": None, "seconds": seconds}
    return {"measured_bytes": None, "error": (done.stderr or done.stdout)[-800:], "seconds": seconds}


def measure_row(size: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row: the estimate, the measured peak (stagger = layers for low-rank rows) and the stagger-1 peak."""
    stagger = stagger_of(size, variant, stagger_one=False)
    kind = "cpu" if args.device == "cpu" else "cuda"
    estimate = estimate_memory(*shapes(size, variant, stagger, kind))
    child = run_child(size, variant, stagger, args)
    measured = child["measured_bytes"]
    row: dict[str, Any] = {
        "size": size,
        "variant": variant,
        "dtype": str(SIZES[size].dtype).removeprefix("torch."),
        "stagger": stagger,
        "estimated_bytes": estimate.total,
        "measured_bytes": measured,
        "error_fraction": None if measured is None else round(estimate.total / measured - 1, 4),
        "gated": measured is not None and measured > args.gate_above,
        "estimate": estimate.as_dict(),
        "child": child,
    }
    row["passes"] = None if not row["gated"] else abs(row["error_fraction"]) <= TOLERANCE
    if VARIANTS[variant].optimizer == "lowrank" and not args.no_stagger_one:
        one = run_child(size, variant, 1, args)
        row["stagger1_measured_bytes"] = one["measured_bytes"]
        row["stagger1_estimated_bytes"] = estimate_memory(*shapes(size, variant, 1, kind)).total
        row["stagger1_child"] = one
    return row


def _states_label(row: dict[str, Any]) -> str:
    precision = VARIANTS[row["variant"]].precision
    if precision == "fp32" and row["dtype"] != "float32":
        return f"{precision} (moments {row['dtype']}: torch AdamW follows the parameters)"
    return precision


def rows_table(rows: list[dict[str, Any]]) -> str:
    header = ["size", "variant", "params", "states", "estimated MiB", "measured MiB", "error", "gated (> 2 GiB)"]
    header += ["stagger-1 measured MiB", "stagger-1 estimated MiB"]
    lines = []
    for r in rows:
        error = "-" if r["error_fraction"] is None else f"{100 * r['error_fraction']:+.1f}%"
        gate = "no" if not r["gated"] else ("pass" if r["passes"] else "FAIL")
        if r["child"]["error"]:
            gate = "did not run: " + r["child"]["error"].strip().splitlines()[-1][:80]
        lines.append(
            [
                r["size"],
                r["variant"],
                r["dtype"],
                _states_label(r),
                mib(r["estimated_bytes"]),
                mib(r["measured_bytes"]),
                error,
                gate,
                mib(r.get("stagger1_measured_bytes")),
                mib(r.get("stagger1_estimated_bytes")),
            ]
        )
    return markdown_table(header, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="only these sizes (default: 60m-1b)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="only these variants")
    parser.add_argument("--steps", type=int, default=2, help="training steps per row (>= 2: step 1 refreshes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-stagger-one", action="store_true", help="skip the stagger-1 runs of low-rank rows")
    parser.add_argument("--table-7b", action="store_true", help="print and write the 7B table only")
    parser.add_argument("--gate-above", type=float, default=2 * GIB, help="bytes above which the 10%% gate applies")
    parser.add_argument("--child-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "VARIANT", "STAGGER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = pick_device(args.device)
    args.device = str(device)
    if args.child:
        from _memory_child import run_row

        size, variant, stagger = args.child
        print("RESULT " + json.dumps(run_row(size, variant, int(stagger), args.steps, device)))
        return
    seven_b = table_7b()
    rows: list[dict[str, Any]] = []
    if not args.table_7b:
        selected = QUICK_ROWS if args.quick else DEFAULT_ROWS
        if args.sizes:
            selected = tuple((s, v) for s in args.sizes for v in VARIANTS if s == "1b" or not VARIANTS[v].checkpointing)
        if args.variants:
            selected = tuple((s, v) for s, v in selected if v in args.variants)
        for size, variant in selected:
            rows.append(measure_row(size, variant, args))
            print(rows_table(rows[-1:]).splitlines()[-1], flush=True)
    text = (rows_table(rows) + "\n\n" if rows else "") + seven_b["markdown"]
    text += "\n\n" + targets_markdown(seven_b["targets"])
    print(text)
    meta = run_metadata(device, {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    meta["child_env"] = CHILD_ENV
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": meta,
        "tolerance": TOLERANCE,
        "rows": rows,
        "table_7b": seven_b["rows"],
        "projected_targets_7b": seven_b["targets"],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    failed = [f"{r['size']} {r['variant']}" for r in rows if r["passes"] is False]
    if failed:
        print(f"estimate off by more than {TOLERANCE:.0%} on: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
