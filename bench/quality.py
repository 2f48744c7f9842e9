"""Training-quality benchmark: AdamW, GaLore, SARA, GoLore, Fira and Fira + importance on the same token budget.

What is measured: the final validation loss (and perplexity) of the embedded default recipe (configs/default.yaml: a
1.84M-parameter LLaMA on the stdlib corpus, rank 32, alpha 0.25) trained by each method for the same number of steps
(same batches: the same seed gives the same init and data order whatever the optimizer), and for the low-rank
methods the subspace overlap ||B_old^T B_new||_F^2 / r at every refresh (mean over the projected matrices, beside
its chance level r/d).

How: every run is the recipe itself, ``lowrank_recipes.recipes.config.load_run_config('default', overrides)`` and
``lowrank_recipes.recipes.trainer.fit(run, resolved, [QualityRecorder()])`` (bench/_quality_run.py), so the benchmark
measures what users run; run outputs go to a scratch directory (``--work-dir``, default a temporary one), never
runs/default.

1. Learning-rate sweep, seed 0, three log-spaced values per method (``LR_GRIDS``): at this scale the plain group's
   lr (embeddings, head, norms get lr, projected weights lr * alpha) decides rankings (docs/reference.md, "Fair
   comparisons"). The best value by final validation loss is kept; a best value at the edge of its grid is flagged.
2. Seeds 1..n-1 of every method at its best lr (the sweep run is seed 0).
3. The randomized-SVD selectors (randomized_dominant, randomized_importance), one seed at GaLore's / SARA's best lr.

Methods (``optimizer.*`` overrides of the default config): adamw (full rank), galore (selector dominant), sara
(importance), golore (random: GoLore's random subspace throughout, not its dominant-then-random schedule), fira
(dominant + Fira's residual), fira_importance (importance + residual).

Reported (bench/results/quality.md and .json, quality_loss.png, quality_overlap.png): per method mean +- std and
the 95% Student-t interval of the final validation loss and perplexity; the paired (per-seed) difference to GaLore
and to AdamW with its 95% interval; the fraction of the GaLore-to-AdamW gap closed, (L_GaLore - L_m) / (L_GaLore -
L_AdamW), only where that gap is clearly positive; the sweep; the mean overlap at each refresh per method/selector
with r/d; one sentence on whether importance sampling beats GaLore beyond the seed spread.

Usage::

    python bench/quality.py                        # 32 runs of 300 steps, two at a time x 1 thread, ~30-45 min
                                                   # on 2 quiet CPU cores
    python bench/quality.py --jobs 1 --threads 2   # one run at a time on two threads, in this process
    python bench/quality.py --quick --out-dir /tmp/q   # tiny model, every row and plot, about a minute
    python bench/quality.py --seeds 5 --steps 600  # longer, more seeds

The device is chosen automatically (cuda when available, passed to the recipe as trainer.accelerator) and recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from _common import TINY_RECIPE, pick_device, run_metadata
from _quality_report import render_markdown, write_plots
from _quality_run import RunSpec, train_one
from _quality_stats import gap_closed, paired_difference, summarize

POET_COMMON = ("optimizer.name=poet", "optimizer.lr=0.01", "optimizer.poet.merge_every=100")
# method -> (selector, or a label for POET, or None for full rank; optimizer overrides)
METHODS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "adamw": (None, ("optimizer.name=adamw",)),
    "galore": ("dominant", ("optimizer.lowrank.selector=dominant",)),
    "sara": ("importance", ("optimizer.lowrank.selector=importance",)),
    "golore": ("random", ("optimizer.lowrank.selector=random",)),
    "fira": ("dominant", ("optimizer.lowrank.selector=dominant", "optimizer.lowrank.fira=true")),
    "fira_importance": ("importance", ("optimizer.lowrank.selector=importance", "optimizer.lowrank.fira=true")),
    # POET (W = R W0 P) with b/d = 1/4 and 1/2 of the default model's hidden size 128, a merge every 100 steps; the
    # plain group (embeddings, head, norms) at the low-rank runs' lr 0.01, the sweep over the generators' lr
    "poet_b32": ("poet (b=32)", POET_COMMON + ("optimizer.poet.block_size=32",)),
    "poet_b64": ("poet (b=64)", POET_COMMON + ("optimizer.poet.block_size=64",)),
}
# randomized variant -> (selector, the method whose best lr it uses)
RANDOMIZED: dict[str, tuple[str, str]] = {
    "galore_randomized": ("randomized_dominant", "galore"),
    "sara_randomized": ("randomized_importance", "sara"),
}
# Log-spaced (x2.5) grids: around the reference lr 0.01 (alpha 0.25) for low-rank; lower for full-rank AdamW, whose
# attention/MLP weights move by the full lr (a first full run on 2 CPU cores: 0.002 -> 5.17, 0.005 -> 5.48 at 300
# steps).
LOWRANK_GRID = (0.004, 0.01, 0.025)
ADAMW_GRID = (0.0008, 0.002, 0.005)
# POET's generators: around the reference code's 0.002, factor 4 (no earlier run at this scale to centre on)
POET_GRID = (0.001, 0.004, 0.016)
LR_GRIDS: dict[str, tuple[float, ...]] = {
    m: ADAMW_GRID if m == "adamw" else POET_GRID if m.startswith("poet") else LOWRANK_GRID for m in METHODS
}
# the key the swept lr sets: optimizer.lr (the plain group's; low-rank weights move by lr * alpha), or POET's own
LR_KEYS: dict[str, str] = {m: "optimizer.poet.lr" if m.startswith("poet") else "optimizer.lr" for m in METHODS}

# The sized-down default: 300 steps of the default model, a refresh every 50 steps (5 overlaps per run), validation
# every 50 steps on 64 held-out sequences, no overlap images, checkpoints only at the end (last.ckpt).
VAL_EVERY = 50
FULL_OVERRIDES = (
    "optimizer.refresh.update_gap=50",
    f"trainer.val_every_n_steps={VAL_EVERY}",
    "trainer.log_every_n_steps=50",
    "trainer.checkpoint_every_n_steps=100000",
    "monitor.image_interval=null",
    "data.val_sequences=64",
)
# --quick: a tiny model, rank 8, on the first 100 documents of the corpus (its own small BPE, cached after the
# first run).
QUICK_OVERRIDES = (
    *TINY_RECIPE,
    "model.num_layers=1",
    "data.max_documents=100",
    "trainer.val_every_n_steps=8",
    "trainer.log_every_n_steps=8",
    "trainer.checkpoint_every_n_steps=100000",
    "monitor.image_interval=null",
)


# ----------------------------------------------------------------------------------------------------- planning
def overrides_for(
    args: argparse.Namespace,
    method_overrides: tuple[str, ...],
    lr: float,
    seed: int,
    accelerator: str,
    lr_key: str = "optimizer.lr",
) -> tuple[str, ...]:
    base = QUICK_OVERRIDES if args.quick else FULL_OVERRIDES
    quick_poet = ("optimizer.poet.block_size=8", "optimizer.poet.merge_every=4") if args.quick else ()
    poet = quick_poet if any(o == "optimizer.name=poet" for o in method_overrides) else ()
    return (
        *base,
        *method_overrides,
        *poet,
        f"trainer.max_steps={args.steps}",
        f"{lr_key}={lr}",
        f"seed={seed}",
        f"trainer.accelerator={accelerator}",
    )


def sweep_specs(args: argparse.Namespace, accelerator: str) -> list[RunSpec]:
    specs = []
    for method, (_, method_overrides) in METHODS.items():
        if method not in args.methods:
            continue
        grid = (LR_GRIDS[method][len(LR_GRIDS[method]) // 2],) if args.quick else LR_GRIDS[method]
        specs += [
            RunSpec(method, lr, 0, "sweep", overrides_for(args, method_overrides, lr, 0, accelerator, LR_KEYS[method]))
            for lr in grid
        ]
    return specs


def seed_specs(args: argparse.Namespace, best: dict[str, float], accelerator: str) -> list[RunSpec]:
    specs = [
        RunSpec(
            method,
            best[method],
            seed,
            "seeds",
            overrides_for(args, METHODS[method][1], best[method], seed, accelerator, LR_KEYS[method]),
        )
        for method in METHODS
        if method in args.methods
        for seed in range(1, args.seeds)
    ]
    for name, (selector, lr_from) in RANDOMIZED.items():
        if name not in args.methods:
            continue
        overrides = overrides_for(args, (f"optimizer.lowrank.selector={selector}",), best[lr_from], 0, accelerator)
        specs.append(RunSpec(name, best[lr_from], 0, "randomized", overrides))
    return specs


def planned_runs(args: argparse.Namespace) -> int:
    chosen = [m for m in METHODS if m in args.methods]
    sweep = len(chosen) * (1 if args.quick else len(LOWRANK_GRID))
    return sweep + len(chosen) * (args.seeds - 1) + sum(name in args.methods for name in RANDOMIZED)


# ---------------------------------------------------------------------------------------------------- execution
def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_phase(
    specs: list[RunSpec], args: argparse.Namespace, pool: ProcessPoolExecutor | None, progress: dict[str, Any]
) -> list[dict[str, Any]]:
    """Runs ``specs`` (in this process, or ``args.jobs`` at a time in the pool) and prints progress with an ETA."""
    if pool is None:
        results = []
        for spec in specs:
            results.append(train_one(spec, args.work_dir, args.threads, args.config))
            _progress(results[-1], progress)
        return results
    futures = [pool.submit(train_one, spec, args.work_dir, args.threads, args.config) for spec in specs]
    results = []
    for future in futures:
        results.append(future.result())
        _progress(results[-1], progress)
    return results


def _progress(record: dict[str, Any], progress: dict[str, Any]) -> None:
    progress["done"] += 1
    elapsed = time.perf_counter() - progress["start"]
    left = (progress["total"] - progress["done"]) * elapsed / progress["done"]
    loss = "-" if record["final_loss"] is None else f"{record['final_loss']:.4f}"
    status = f"FAILED: {record['error']}" if record.get("error") else f"val loss {loss}"
    print(
        f"[{progress['done']}/{progress['total']}] {record['name']}: {status} ({record['seconds']:.1f} s; "
        f"elapsed {elapsed / 60:.1f} min, about {left / 60:.1f} min left)",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------- analysis
def best_lrs(sweep: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The lr of the lowest final validation loss per method, and the sweep rows (edge flag included)."""
    best, rows = {}, []
    for method in METHODS:
        runs = sorted((r for r in sweep if r["method"] == method), key=lambda r: r["lr"])
        scored = [r for r in runs if r["final_loss"] is not None and math.isfinite(r["final_loss"])]
        winner = min(scored, key=lambda r: r["final_loss"]) if scored else runs[len(runs) // 2]
        best[method] = winner["lr"]
        grid = [r["lr"] for r in runs]
        edge = len(grid) > 1 and winner["lr"] in (grid[0], grid[-1])
        rows.append(
            {
                "method": method,
                "lrs": grid,
                "final_losses": [r["final_loss"] for r in runs],
                "best_lr": winner["lr"],
                "at_edge": edge,
            }
        )
    return best, rows


def _losses_by_seed(records: list[dict[str, Any]], method: str, lr: float, key: str = "final_loss") -> dict[int, float]:
    return {
        r["seed"]: r[key]
        for r in records
        if r["method"] == method and r["lr"] == lr and r[key] is not None and math.isfinite(r[key])
    }


def method_rows(records: list[dict[str, Any]], best: dict[str, float], edges: set[str]) -> list[dict[str, Any]]:
    """Per method: loss / ppl statistics over seeds at its best lr, paired differences, fraction of the gap closed."""
    lrs = {**best, **{name: best[lr_from] for name, (_, lr_from) in RANDOMIZED.items()}}
    losses = {m: _losses_by_seed(records, m, lr) for m, lr in lrs.items()}
    ppls = {m: _losses_by_seed(records, m, lr, "final_ppl") for m, lr in lrs.items()}
    adamw_vs_galore = paired_difference(losses["adamw"], losses["galore"])
    rows = []
    for method, lr in lrs.items():
        selector = METHODS[method][0] if method in METHODS else RANDOMIZED[method][0]
        vs_galore = paired_difference(losses[method], losses["galore"])
        fraction, why = gap_closed(vs_galore, adamw_vs_galore)
        if method in ("adamw", "galore") and fraction is not None:
            why = "reference"  # 1 and 0 by definition
        seconds = [r["seconds"] for r in records if r["method"] == method and r["lr"] == lr]
        rows.append(
            {
                "method": method,
                "selector": selector or "full rank",
                "lr": lr,
                "seeds": sorted(losses[method]),
                "lr_at_edge": (RANDOMIZED[method][1] if method in RANDOMIZED else method) in edges,
                "loss": summarize(list(losses[method].values())),
                "ppl": summarize(list(ppls[method].values())),
                "vs_galore": vs_galore,
                "vs_adamw": paired_difference(losses[method], losses["adamw"]),
                "gap_closed": fraction,
                "gap_closed_note": why,
                "seconds_per_run": sum(seconds) / len(seconds) if seconds else None,
            }
        )
    return rows


def overlap_rows(records: list[dict[str, Any]], best: dict[str, float]) -> list[dict[str, Any]]:
    """Per low-rank method (at its best lr, mean over seeds): the mean overlap at each refresh step, r/d, per type."""
    lrs = {**best, **{name: best[lr_from] for name, (_, lr_from) in RANDOMIZED.items()}}
    rows = []
    for method, lr in lrs.items():
        runs = [r for r in records if r["method"] == method and r["lr"] == lr and r["refreshes"]]
        if method == "adamw" or not runs:
            continue
        steps = sorted({e["step"] for r in runs for e in r["refreshes"]})
        at = {s: [e for r in runs for e in r["refreshes"] if e["step"] == s] for s in steps}
        types = sorted({t for r in runs for e in r["refreshes"] for t in e["by_type"]})
        rows.append(
            {
                "method": method,
                "selector": METHODS[method][0] if method in METHODS else RANDOMIZED[method][0],
                "runs": len(runs),
                "steps": steps,
                "overlap": [sum(e["overlap"] for e in at[s]) / len(at[s]) for s in steps],
                "chance": sum(e["chance"] for s in steps for e in at[s]) / sum(len(at[s]) for s in steps),
                "by_type": {
                    t: sum(e["by_type"].get(t, 0.0) for s in steps for e in at[s]) / sum(len(at[s]) for s in steps)
                    for t in types
                },
            }
        )
    return rows


def verdict(rows: list[dict[str, Any]]) -> str:
    """One plain sentence: does importance sampling (SARA) beat GaLore beyond the seed spread?"""
    sara = next(r for r in rows if r["method"] == "sara")
    diff = sara["vs_galore"]
    if diff["mean"] is None or diff["ci95"] is None:
        return "Whether importance sampling (SARA) beats GaLore cannot be said: fewer than two common seeds."
    span = (
        f"SARA - GaLore = {diff['mean']:+.4f} in final validation loss, 95% interval over {diff['n']} paired "
        f"seeds [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]"
    )
    if diff["ci95"][1] < 0:
        return f"Importance sampling (SARA) beats GaLore beyond the seed spread ({span})."
    if diff["ci95"][0] > 0:
        return f"Importance sampling (SARA) is worse than GaLore beyond the seed spread ({span})."
    better = "lower" if diff["mean"] < 0 else "higher"
    return (
        f"Importance sampling (SARA) does not beat GaLore beyond the seed spread: its mean loss is {better}, but "
        f"the interval includes zero ({span})."
    )


def overlap_sentence(overlaps: list[dict[str, Any]]) -> str:
    """Whether the mean overlaps order as dominant > importance > random ~ r/d (GaLore, SARA, GoLore runs)."""
    by = {r["method"]: r for r in overlaps}
    if not {"galore", "sara", "golore"} <= set(by):
        return "Overlap ordering: not enough low-rank runs."
    mean = {m: sum(by[m]["overlap"]) / len(by[m]["overlap"]) for m in ("galore", "sara", "golore")}
    chance = by["golore"]["chance"]
    ordered = mean["galore"] > mean["sara"] > mean["golore"]
    g = by["galore"]["overlap"]
    return (
        f"Mean overlap over refreshes: dominant (GaLore) {mean['galore']:.3f}, importance (SARA) "
        f"{mean['sara']:.3f}, random (GoLore) {mean['golore']:.3f}, chance r/d {chance:.3f}: the ordering "
        f"dominant > importance > random {'holds' if ordered else 'does NOT hold'}; random - chance = "
        f"{mean['golore'] - chance:+.3f}; "
        f"the dominant overlap goes from {g[0]:.3f} (step {by['galore']['steps'][0]}) to {g[-1]:.3f} "
        f"(step {by['galore']['steps'][-1]})."
    )


# ---------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (the token budget)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method at its best lr (the sweep is seed 0)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once, each in its own worker process; 1 runs "
        "them in this process (default: 2, or 1 with --quick)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--out-dir", default="bench/results", help="where quality.md/.json and the PNGs go")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="run outputs (TensorBoard, checkpoints, logs); default: a temporary directory, deleted at the end",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 steps, one lr, 2 seeds (about a minute)")
    parser.add_argument(
        "--methods",
        default=",".join([*METHODS, *RANDOMIZED]),
        help=f"comma-separated methods to run (default: all of {', '.join([*METHODS, *RANDOMIZED])})",
    )
    parser.add_argument(
        "--reuse",
        default=None,
        help="an earlier quality.json (same settings) whose runs stand in for the methods not run; its rows say so",
    )
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS and m not in RANDOMIZED]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; accepted: {', '.join([*METHODS, *RANDOMIZED])}")
    if args.reuse is None and set(args.methods) != {*METHODS, *RANDOMIZED}:
        parser.error("--methods with a subset needs --reuse (an earlier quality.json with the other methods' runs)")
    if args.quick:
        args.steps, args.seeds = 16, 2
    if not args.quick and args.steps % VAL_EVERY:
        parser.error(
            f"--steps must be a multiple of {VAL_EVERY} (the validation interval), so that the last "
            "validation is the final step's"
        )
    if args.jobs is None:
        # Two runs at once, one thread each, beat one run on two threads for this model size (measured on 2 busy
        # cores: 2 x 50 steps in 103 s vs 151+ s); --quick's tiny runs are dominated by start-up, so in-process.
        args.jobs = 1 if args.quick else 2
    if args.steps < 1 or args.seeds < 1 or args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps, --seeds, --jobs and --threads must be >= 1")
    if args.threads is None:
        args.threads = 1 if args.quick else max(1, torch.get_num_threads() // args.jobs)
    return args


Records = list[dict[str, Any]]


def execute(args: argparse.Namespace, accelerator: str) -> tuple[Records, dict[str, float], Records]:
    """All phases; returns every run record, the best lr per method and the sweep rows."""
    progress = {"done": 0, "total": planned_runs(args), "start": time.perf_counter()}
    pool = None
    if args.jobs > 1:
        pool = ProcessPoolExecutor(
            args.jobs, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(args.threads,)
        )
    reused = reused_records(args)
    try:
        sweep = run_phase(sweep_specs(args, accelerator), args, pool, progress)
        sweep += [r for r in reused if r["phase"] == "sweep"]
        best, sweep_rows = best_lrs(sweep)
        rest = run_phase(seed_specs(args, best, accelerator), args, pool, progress)
        rest += [r for r in reused if r["phase"] != "sweep"]
    finally:
        if pool is not None:
            pool.shutdown()
    return sweep + rest, best, sweep_rows


def reused_records(args: argparse.Namespace) -> Records:
    """The runs of ``--reuse`` (an earlier quality.json) of every method this invocation does not run, marked
    ``reused``; none without ``--reuse``. Every method must then have its runs, from one side or the other."""
    if args.reuse is None:
        return []
    earlier = json.loads(Path(args.reuse).read_text())
    records = [{**r, "reused": args.reuse} for r in earlier["runs"] if r["method"] not in args.methods]
    missing = [
        m for m in (*METHODS, *RANDOMIZED) if m not in args.methods and not any(r["method"] == m for r in records)
    ]
    if missing:
        raise SystemExit(
            f"--reuse {args.reuse}: no runs of {missing}; accepted: a quality.json holding them, or --methods with them"
        )
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    accelerator = "gpu" if device.type == "cuda" else device.type
    scratch = None
    if args.work_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="quality-runs-")
        args.work_dir = scratch.name
    args.config = snapshot_config(args.work_dir)
    meta = run_metadata(device, vars(args))
    total = planned_runs(args)
    # seconds per run on 2 quiet cores: ~0.3 s/step on one thread, plus ~10 s of start-up (tokenising the corpus)
    # and validation; --quick: start-up only
    per_run = 5.0 if args.quick else 0.3 * args.steps + 10
    print(
        f"quality benchmark: {total} runs of {args.steps} steps on {device}, {args.jobs} at a time x "
        f"{args.threads} threads; ETA about {total * per_run / args.jobs / 60:.0f} min (refined as runs finish); "
        f"run outputs in {args.work_dir}",
        flush=True,
    )
    records, best, sweep_rows = execute(args, accelerator)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the raw runs first: a failure in the analysis below must not lose them
    (out / "quality.json").write_text(json.dumps({"meta": meta, "runs": records}, indent=2) + "\n")
    rows = method_rows(records, best, {r["method"] for r in sweep_rows if r["at_edge"]})
    overlaps = overlap_rows(records, best)
    result = {
        "meta": meta,
        "settings": settings(args, accelerator),
        "methods": rows,
        "sweep": sweep_rows,
        "overlaps": overlaps,
        "verdict": verdict(rows),
        "overlap_summary": overlap_sentence(overlaps),
        "runs": records,
        "failed": [r["name"] for r in records if r.get("error")],
        "reused": {"from": args.reuse, "methods": sorted({r["method"] for r in records if r.get("reused")})},
    }
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render_markdown(result)
    (out / "quality.md").write_text(markdown)
    write_plots(result, out)
    print("\n" + markdown + f"\nwrote {out / 'quality.md'}, quality.json, quality_loss.png, quality_overlap.png")
    if scratch is not None:
        scratch.cleanup()
    return 1 if result["failed"] else 0


def snapshot_config(work_dir: str) -> str:
    """Copies configs/default.yaml into the work directory: every run reads that copy, so all runs of one benchmark
    train the same recipe even if the file is edited meanwhile."""
    from lowrank_recipes.recipes.config import resolve_config_path

    target = Path(work_dir) / "default.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(resolve_config_path("default"), target)
    return str(target)


def settings(args: argparse.Namespace, accelerator: str) -> dict[str, Any]:
    digest = hashlib.sha256(Path(args.config).read_bytes()).hexdigest()
    return {
        "config": "default",
        "config_sha256": digest,
        "steps": args.steps,
        "seeds": args.seeds,
        "accelerator": accelerator,
        "common_overrides": list(QUICK_OVERRIDES if args.quick else FULL_OVERRIDES),
        "methods": {m: list(o) for m, (_, o) in METHODS.items()},
        "randomized": {m: {"selector": s, "lr_from": f} for m, (s, f) in RANDOMIZED.items()},
        "lr_grids": {m: list(g[len(g) // 2 : len(g) // 2 + 1] if args.quick else g) for m, g in LR_GRIDS.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
