"""Training quality at a long horizon: does importance sampling (SARA) help once GaLore's dominant subspace freezes?

The 300-step study (bench/quality.py) ends while the dominant overlap is still climbing. This one trains the default
model (configs/default.yaml) for 3000 steps on the stdlib source corpus (``data.source=stdlib_code``: about 12M
characters, 3.3M tokens, so 3000 steps of 16 x 128 tokens read it about 1.9 times; every run reports its epochs),
where consecutive dominant subspaces can become nearly identical, and compares:

* galore (dominant selector), sara (importance), golore (random), all at rank 32, alpha 0.25;
* adamw_split: AdamW with the low-rank runs' two rates (plain group at lr, the attention and MLP matrices at
  lr x alpha: ``optimizer.target_lr_scale`` = alpha), which separates the subspace from the matrices' learning rate;
* adamw: AdamW with one learning rate.

Design (all runs are the recipe itself, through bench/_quality_run.py; same seed = same init and data order):

1. Pilot: GaLore, seed 0, at the default lr, ``--steps`` steps; started first. Its dominant overlap curve says whether
   the frozen regime (overlap >= 0.8) is reached.
2. Learning-rate sweep at ``--sweep-steps`` steps, seed 0: three values with factor-2 spacing per method; where the
   best sits at an edge of its grid, the grid is extended by one value beyond that edge, once; a best value still at
   an edge is reported as such.
3. ``--steps`` steps at each method's best lr: galore and sara with ``--seeds`` paired seeds, the others one seed.
   A run identical to one already made (the pilot, when GaLore's best lr is the default) is not made again.

Runs go ``--jobs`` at a time (default 2 x 1 thread), each in its own worker process, started as soon as what they need
is known (a method's long runs start when its sweep is decided). Every finished run's record is written to
``<work-dir>/records/``; a second invocation with the same ``--work-dir`` reuses them (a benchmark killed mid-way
continues where it stopped; a run killed mid-way starts again). ``--report-only`` writes the report from those records.

Report (``<out-dir>/quality_long.md`` and ``.json``, ``quality_long_loss.png``, ``quality_long_overlap.png``,
``quality_long_difference.png``): bench/_quality_long_report.py.

Usage::

    python bench/quality_long.py --work-dir runs/quality-long        # ~110 min on 2 quiet CPU cores
    python bench/quality_long.py --work-dir runs/quality-long --report-only
    python bench/quality_long.py --quick --out-dir /tmp/ql            # tiny model, every phase, about a minute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml

from _common import TINY_RECIPE, pick_device, run_metadata
from _quality_run import RunSpec, train_one

# method -> (selector or None for full rank, optimizer overrides); adamw_split's target_lr_scale is filled in from
# the config's lowrank.alpha (``method_overrides``).
METHODS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "galore": ("dominant", ("optimizer.lowrank.selector=dominant",)),
    "sara": ("importance", ("optimizer.lowrank.selector=importance",)),
    "golore": ("random", ("optimizer.lowrank.selector=random",)),
    "adamw_split": (None, ("optimizer.name=adamw",)),
    "adamw": (None, ("optimizer.name=adamw",)),
}
PAIRED = ("galore", "sara")  # the methods run with --seeds paired seeds at the long horizon
# Factor-2 grids: around the reference lr 0.01 for the low-rank runs and adamw_split (the same parametrization:
# plain group at lr, matrices at lr x alpha); around the 300-step study's best value 0.002 for AdamW with one lr.
LOWRANK_GRID = (0.005, 0.01, 0.02)
GRIDS: dict[str, tuple[float, ...]] = {m: (0.001, 0.002, 0.004) if m == "adamw" else LOWRANK_GRID for m in METHODS}
PILOT = ("galore", 0.01)  # the default config's lr
FACTOR = 2.0  # grid spacing, and the step of an extension

VAL_EVERY = 250
FULL_OVERRIDES = (
    "data.source=stdlib_code",
    "optimizer.refresh.update_gap=100",
    f"trainer.val_every_n_steps={VAL_EVERY}",
    "trainer.log_every_n_steps=50",
    "trainer.checkpoint_every_n_steps=100000",
    "monitor.image_interval=null",
    "data.val_sequences=512",
)
QUICK_VAL_EVERY = 4
QUICK_OVERRIDES = (
    "data.source=stdlib_code",
    *TINY_RECIPE,
    "model.num_layers=1",
    "data.max_documents=40",
    f"trainer.val_every_n_steps={QUICK_VAL_EVERY}",
    "trainer.log_every_n_steps=4",
    "trainer.checkpoint_every_n_steps=100000",
    "monitor.image_interval=null",
)


# ----------------------------------------------------------------------------------------------------- planning
def method_overrides(method: str, alpha: float) -> tuple[str, ...]:
    extra = (f"optimizer.target_lr_scale={alpha}",) if method == "adamw_split" else ()
    return (*METHODS[method][1], *extra)


def make_spec(args: argparse.Namespace, method: str, lr: float, seed: int, steps: int, phase: str) -> RunSpec:
    base = QUICK_OVERRIDES if args.quick else FULL_OVERRIDES
    overrides = (
        *base,
        *method_overrides(method, args.alpha),
        f"trainer.max_steps={steps}",
        f"optimizer.lr={lr}",
        f"seed={seed}",
        f"trainer.accelerator={args.accelerator}",
    )
    return RunSpec(method, lr, seed, phase, overrides)


def run_key(spec: RunSpec) -> str:
    """The run's identity: method, lr, seed and length (the phase does not count: the pilot may be a long run)."""
    steps = next(o.split("=", 1)[1] for o in spec.overrides if o.startswith("trainer.max_steps="))
    return f"{spec.name}-n{steps}"


def extension(grid: list[float], best: float) -> float | None:
    """The value one factor-2 step beyond the grid edge where ``best`` sits, else None."""
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return None
    return grid[0] / FACTOR if best == grid[0] else grid[-1] * FACTOR


def pick_best(records: list[dict[str, Any]]) -> tuple[float, bool]:
    """(lr of the lowest final validation loss, whether it sits at an edge of the lrs tried); failed runs lose."""
    ordered = sorted(records, key=lambda r: r["lr"])
    scored = [r for r in ordered if r.get("final_loss") is not None and not r.get("error")]
    best = min(scored, key=lambda r: r["final_loss"])["lr"] if scored else ordered[len(ordered) // 2]["lr"]
    lrs = [r["lr"] for r in ordered]
    return best, len(lrs) > 1 and best in (lrs[0], lrs[-1])


class Plan:
    """Decides what runs next from what has finished: the sweep per method, its extension once, then the long runs.

    ``submit(spec)`` is called for every run to make; identical runs (``run_key``) are made once.
    """

    def __init__(self, args: argparse.Namespace, submit: Any) -> None:
        self.args, self.submit = args, submit
        self.records: dict[str, dict[str, Any]] = {}
        self.requested: set[str] = set()
        self.sweep: dict[str, list[str]] = {m: [] for m in METHODS}
        self.extended: set[str] = set()
        self.best: dict[str, float] = {}

    def request(self, spec: RunSpec) -> str:
        key = run_key(spec)
        if key not in self.requested:
            self.requested.add(key)
            self.submit(key, spec)
        return key

    def start(self) -> None:
        a = self.args
        self.request(make_spec(a, PILOT[0], PILOT[1], 0, a.steps, "pilot"))
        for method in METHODS:
            grid = GRIDS[method]
            for lr in grid:
                self.sweep[method].append(self.request(make_spec(a, method, lr, 0, a.sweep_steps, "sweep")))

    def finished(self, key: str, record: dict[str, Any]) -> None:
        self.records[key] = record
        for method in METHODS:
            if method in self.best or not all(k in self.records for k in self.sweep[method]):
                continue
            runs = [self.records[k] for k in self.sweep[method]]
            best, _ = pick_best(runs)
            beyond = extension(sorted(r["lr"] for r in runs), best)
            if beyond is not None and method not in self.extended:
                self.extended.add(method)
                spec = make_spec(self.args, method, beyond, 0, self.args.sweep_steps, "sweep")
                self.sweep[method].append(self.request(spec))
                continue
            self.best[method] = best
            seeds = range(self.args.seeds) if method in PAIRED else range(1)
            for seed in seeds:
                self.request(make_spec(self.args, method, best, seed, self.args.steps, "long"))

    def done(self) -> bool:
        return len(self.best) == len(METHODS) and self.requested <= set(self.records)


# ---------------------------------------------------------------------------------------------------- execution
def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _record_path(args: argparse.Namespace, key: str) -> Path:
    return Path(args.work_dir) / "records" / f"{key}.json"


def _train(args: argparse.Namespace, key: str, spec: RunSpec) -> dict[str, Any]:
    """Trains one run in ``<work-dir>/runs/<key>`` (a leftover of a killed attempt is removed first)."""
    out = Path(args.work_dir) / "runs" / key
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    record = train_one(spec, str(out), args.threads, args.config)
    record["key"] = key
    return record


def execute(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs the plan; returns every record (cached ones included)."""
    pool = None
    if args.jobs > 1:
        pool = ProcessPoolExecutor(
            args.jobs, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(args.threads,)
        )
    futures: dict[Future, str] = {}
    ready: list[tuple[str, dict[str, Any]]] = []
    queue: list[tuple[str, RunSpec]] = []
    start = time.perf_counter()

    def submit(key: str, spec: RunSpec) -> None:
        path = _record_path(args, key)
        if path.exists():
            ready.append((key, json.loads(path.read_text())))
        elif pool is None:
            queue.append((key, spec))
        else:
            futures[pool.submit(_train, args, key, spec)] = key

    plan = Plan(args, submit)
    plan.start()
    try:
        while not plan.done():
            if ready:
                plan.finished(*ready.pop(0))
                continue
            if pool is None:
                key, spec = queue.pop(0)
                record = _train(args, key, spec)
            else:
                finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                future = finished.pop()
                key = futures.pop(future)
                record = future.result()
            _save(args, key, record)
            _progress(record, len(plan.records) + 1, len(plan.requested), start)
            plan.finished(key, record)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return list(plan.records.values())


def _save(args: argparse.Namespace, key: str, record: dict[str, Any]) -> None:
    """Keeps a finished run's record (a failed run's too: the report names it; delete the file to retry it)."""
    path = _record_path(args, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def _progress(record: dict[str, Any], done: int, requested: int, start: float) -> None:
    loss = "-" if record.get("final_loss") is None else f"{record['final_loss']:.4f}"
    status = f"FAILED: {record['error']}" if record.get("error") else f"val loss {loss}"
    print(
        f"[{done}/{requested} so far] {record['key']}: {status} ({record['seconds']:.0f} s; elapsed "
        f"{(time.perf_counter() - start) / 60:.1f} min)",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="long-run steps (default 3000; --quick 24)")
    parser.add_argument("--sweep-steps", type=int, default=None, help="sweep-run steps (default 500; --quick 8)")
    parser.add_argument("--seeds", type=int, default=None, help="paired seeds of galore and sara (default 3; quick 2)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default 2; --quick 1: in-process)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--out-dir", default="bench/results", help="where quality_long.md/.json and the PNGs go")
    parser.add_argument("--work-dir", default=None, help="run outputs and records (default: a temporary directory)")
    parser.add_argument("--report-only", action="store_true", help="write the report from --work-dir's records")
    parser.add_argument("--quick", action="store_true", help="tiny model and runs, every phase (about a minute)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (24 if quick else 3000)
    args.sweep_steps = args.sweep_steps or (8 if quick else 500)
    args.seeds = args.seeds or (2 if quick else 3)
    args.jobs = args.jobs or (1 if quick else 2)
    every = QUICK_VAL_EVERY if quick else VAL_EVERY
    if args.steps % every or args.sweep_steps % every:
        parser.error(f"--steps and --sweep-steps must be multiples of {every} (the validation interval)")
    if min(args.steps, args.sweep_steps, args.seeds, args.jobs) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps, --sweep-steps, --seeds, --jobs and --threads must be >= 1")
    if args.report_only and args.work_dir is None:
        parser.error("--report-only reads the records of a --work-dir")
    if args.threads is None:
        args.threads = 1 if quick else max(1, torch.get_num_threads() // args.jobs)
    return args


def snapshot_config(work_dir: str) -> str:
    """Copies configs/default.yaml into the work directory (kept when it is already there: a continued benchmark
    trains the recipe it started with)."""
    from lowrank_recipes.recipes.config import resolve_config_path

    target = Path(work_dir) / "default.yaml"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(resolve_config_path("default"), target)
    return str(target)


def settings(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": "default",
        "config_sha256": hashlib.sha256(Path(args.config).read_bytes()).hexdigest(),
        "steps": args.steps,
        "sweep_steps": args.sweep_steps,
        "val_every": QUICK_VAL_EVERY if args.quick else VAL_EVERY,
        "seeds": args.seeds,
        "accelerator": args.accelerator,
        "alpha": args.alpha,
        "global_batch_size": config["trainer"]["global_batch_size"],
        "common_overrides": list(QUICK_OVERRIDES if args.quick else FULL_OVERRIDES),
        "methods": {m: list(method_overrides(m, args.alpha)) for m in METHODS},
        "grids": {m: list(g) for m, g in GRIDS.items()},
        "pilot": {"method": PILOT[0], "lr": PILOT[1]},
        "paired": list(PAIRED),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    args.accelerator = "gpu" if device.type == "cuda" else device.type
    scratch = None
    if args.work_dir is None:
        import tempfile

        scratch = tempfile.TemporaryDirectory(prefix="quality-long-")
        args.work_dir = scratch.name
    args.config = snapshot_config(args.work_dir)
    config = yaml.safe_load(Path(args.config).read_text())
    overrides = dict(o.split("=", 1) for o in (QUICK_OVERRIDES if args.quick else FULL_OVERRIDES))
    config["trainer"]["global_batch_size"] = int(
        overrides.get("trainer.global_batch_size", config["trainer"]["global_batch_size"])
    )
    args.alpha = float(config["optimizer"]["lowrank"]["alpha"])
    if args.report_only:
        records = [json.loads(p.read_text()) for p in sorted((Path(args.work_dir) / "records").glob("*.json"))]
    else:
        print(
            f"quality at a long horizon: pilot + sweep ({args.sweep_steps} steps) + long runs ({args.steps} steps) on "
            f"{device}, {args.jobs} at a time x {args.threads} threads; records in {args.work_dir}/records",
            flush=True,
        )
        records = execute(args)
    from _quality_long_report import build_result, render_markdown, write_plots

    result = build_result(records, settings(args, config), run_metadata(device, vars(args)))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_long.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render_markdown(result)
    (out / "quality_long.md").write_text(markdown)
    write_plots(result, out)
    print("\n" + markdown + f"\nwrote {out / 'quality_long.md'}, quality_long.json and the PNGs")
    if scratch is not None:
        scratch.cleanup()
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
