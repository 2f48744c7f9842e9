"""Training throughput of the whole loop: tokens per second of the recipe's own training per method, beside AdamW.

Every measurement is the recipe itself (``recipes.config.load_run_config('default', overrides)`` and
``recipes.trainer.fit``: the LightningModule, the Trainer with its callbacks, the embedded data path) in a fresh
child process (this script with ``--child``), ``--warmup`` optimizer steps (and compilation) untimed, then
``--steps`` timed steps that include refreshes (``update_gap`` is set so that at least two fall in the window). A
callback takes the wall time of every optimizer step (the device drained at each step's end); the child reports
tokens/s over the timed window, the median step, the refresh cost amortised per step (mean minus median step: the
refresh steps' excess spread over every step; noise can make it slightly negative) and the peak memory (GPU: the
allocator's peak; CPU: the resident peak above the resident memory when the timed window starts).

Variants (``VARIANTS``): AdamW; low-rank with the dominant and the importance rule, each with the exact and the
randomized SVD; randomized importance with stagger 4, with 8-bit states, with per-layer updates, with projected
gradients; POET with block size d/4 and d/2 (d the hidden size; a merge in the timed window); and ``+compile``
(``model.compile=true``) for AdamW and randomized importance with stagger 4 on a CPU, for every variant on a GPU.
Repetitions are interleaved (every variant once, then again), and the report gives the median and the interquartile
range over them, and the ratio to AdamW of the same repetition (median).

Anchor printed beside it: GaLore's published LLaMA 1B figures at token batch 256 on one GPU (the GaLore paper):
AdamW 1257 tokens/s, 8-bit Adam 1570, 8-bit GaLore 1109 (0.88x AdamW), 8-bit GaLore with per-layer
updates 1020. Target on a GPU: low-rank training with randomized refreshes and stagger >= 0.95x AdamW. On a 2-core
CPU the table is informational.

    python bench/throughput.py --quick                      # tiny model, seconds per child (a test runs this)
    python bench/throughput.py                              # default size and 60M on this machine's device
    python bench/throughput.py --sizes 60m 350m --tokens 8x256 --precision bf16-true   # the GPU check's section

Results: JSON (``--out``) and the table as markdown beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import (
    current_rss_bytes,
    markdown_table,
    median,
    peak_rss_bytes,
    pick_device,
    quartiles,
    reset_peak,
    run_metadata,
    synchronize,
)

RANDOMIZED = ("optimizer.lowrank.selector=randomized_importance",)
STAGGER4 = (*RANDOMIZED, "optimizer.refresh.stagger=4")
VARIANTS: dict[str, tuple[str, ...]] = {
    "adamw": ("optimizer.name=adamw",),
    "dominant": ("optimizer.lowrank.selector=dominant",),
    "importance": ("optimizer.lowrank.selector=importance",),
    "randomized-dominant": ("optimizer.lowrank.selector=randomized_dominant",),
    "randomized-importance": RANDOMIZED,
    "randomized-importance-stagger4": STAGGER4,
    "randomized-importance-stagger4-8bit": (*STAGGER4, "optimizer.state_precision=8bit"),
    "randomized-importance-stagger4-per-layer": (*STAGGER4, "trainer.per_layer_updates=true"),
    "randomized-importance-stagger4-projected": (*STAGGER4, "optimizer.lowrank.projected_gradients=true"),
    # POET (W = R W0 P) with block size d/4 and d/2 of the model's hidden size d (the paper's b/d), a merge in the
    # timed window (``overrides``)
    "poet-b-d4": ("optimizer.name=poet",),
    "poet-b-d2": ("optimizer.name=poet",),
}
POET_DIVISORS = {"poet-b-d4": 4, "poet-b-d2": 2}
COMPILED_ON_CPU = ("adamw", "randomized-importance-stagger4")
# model shapes over the embedded tokenizer's vocabulary (4096): "default" is configs/default.yaml's model
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_layers": 2},
    "default": {"hidden_size": 128, "intermediate_size": 344, "num_heads": 4, "num_layers": 4},
    "60m": {"hidden_size": 512, "intermediate_size": 1376, "num_heads": 8, "num_layers": 8},
    "130m": {"hidden_size": 768, "intermediate_size": 2048, "num_heads": 12, "num_layers": 12},
    "350m": {"hidden_size": 1024, "intermediate_size": 2736, "num_heads": 16, "num_layers": 24},
}
RANKS = {"tiny": 8, "default": 32, "60m": 128, "130m": 256, "350m": 256}
PUBLISHED_1B = {"AdamW": 1257, "8-bit Adam": 1570, "8-bit GaLore": 1109, "8-bit GaLore, per-layer": 1020}


def overrides(size: str, variant: str, args: argparse.Namespace, out_dir: str) -> list[str]:
    """The recipe overrides of one run: the size's shape, the token batch, the window, the variant."""
    batch, seq = args.tokens
    name, compiled = (variant[: -len("+compile")], True) if variant.endswith("+compile") else (variant, False)
    total = args.warmup + args.steps
    gap = max(2, args.steps // 2)  # at least two refreshes in the timed window
    shape = [f"model.{key}={value}" for key, value in SIZES[size].items()]
    return [
        *shape,
        f"model.max_seq_len={seq}",
        f"data.seq_len={seq}",
        f"data.micro_batch_size={batch}",
        f"trainer.global_batch_size={batch}",
        f"trainer.max_steps={total}",
        f"trainer.precision={args.precision}",
        f"trainer.accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}",
        "trainer.devices=1",
        f"trainer.val_every_n_steps={total + 1}",
        f"trainer.checkpoint_every_n_steps={total + 1}",
        f"trainer.log_every_n_steps={total + 1}",
        f"optimizer.lowrank.rank={RANKS[size]}",
        f"optimizer.refresh.update_gap={gap}",
        f"model.compile={str(compiled).lower()}",
        f"out_dir={out_dir}",
        *VARIANTS[name],
        *poet_overrides(size, name, gap),
    ]


def poet_overrides(size: str, variant: str, gap: int) -> list[str]:
    """A POET variant's block size (hidden size / divisor) and merge interval (a merge in the timed window)."""
    if variant not in POET_DIVISORS:
        return []
    block = max(2, SIZES[size]["hidden_size"] // POET_DIVISORS[variant])
    return [f"optimizer.poet.block_size={block}", f"optimizer.poet.merge_every={gap}"]


def run_child(size: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One (size, variant) run in a fresh process; its RESULT line, or the error."""
    command = [sys.executable, __file__, "--child", size, variant, *args.forward]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout)
    seconds = time.perf_counter() - start
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "child_seconds": round(seconds, 1)}
    return {"error": (done.stderr or done.stdout)[-2000:], "child_seconds": round(seconds, 1)}


def child(size: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs the recipe with a step timer; returns what the parent reports."""
    import lightning.pytorch as pl

    from lowrank_recipes.recipes.config import load_run_config
    from lowrank_recipes.recipes.trainer import fit

    device = pick_device(args.device)
    batch, seq = args.tokens

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.rss_before = 0

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            synchronize(device)
            self.ends.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if len(self.ends) - 1 < trainer.global_step:  # this micro-batch ended an optimizer step
                synchronize(device)
                self.ends.append(time.perf_counter())
                if trainer.global_step == args.warmup:  # the timed window starts: its peak too
                    reset_peak(device)
                    self.rss_before = current_rss_bytes()

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        run, resolved = load_run_config("default", overrides(size, variant, args, out_dir))
        fit(run, resolved, callbacks=[timer])
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])][args.warmup :]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = max(0, peak_rss_bytes() - timer.rss_before)
    tokens = batch * seq
    return {
        "size": size,
        "variant": variant,
        "tokens_per_step": tokens,
        "step_s": steps,
        "tokens_per_s": tokens * len(steps) / sum(steps),
        "median_step_s": median(steps),
        "refresh_cost_per_step_s": sum(steps) / len(steps) - median(steps),
        "peak_bytes": peak,
    }


def summarize(runs: list[dict[str, Any]], sizes: list[str], variants: list[str]) -> list[dict[str, Any]]:
    """Per (size, variant): median and quartiles of tokens/s over the repetitions, ratio to the same repetition's
    AdamW (median), median amortised refresh cost, largest peak."""
    rows = []
    for size in sizes:
        adamw = {r["repeat"]: r for r in runs if r["size"] == size and r["variant"] == "adamw" and "error" not in r}
        for variant in variants:
            mine = [r for r in runs if r["size"] == size and r["variant"] == variant]
            ok = [r for r in mine if "error" not in r]
            if not ok:
                rows.append({"size": size, "variant": variant, "error": mine[0]["error"] if mine else "not run"})
                continue
            rates = [r["tokens_per_s"] for r in ok]
            ratios = [r["tokens_per_s"] / adamw[r["repeat"]]["tokens_per_s"] for r in ok if r["repeat"] in adamw]
            rows.append(
                {
                    "size": size,
                    "variant": variant,
                    "repeats": len(ok),
                    "tokens_per_s": median(rates),
                    "tokens_per_s_quartiles": quartiles(rates),
                    "ratio_to_adamw": median(ratios) if ratios else None,
                    "refresh_cost_per_step_s": median([r["refresh_cost_per_step_s"] for r in ok]),
                    "median_step_s": median([r["median_step_s"] for r in ok]),
                    "peak_mib": max(r["peak_bytes"] for r in ok) / 2**20,
                }
            )
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    header = ["size", "variant", "tokens/s (IQR)", "x AdamW", "refresh ms/step", "median step ms", "peak MiB"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(
                [r["size"], r["variant"], "error: " + r["error"].strip().splitlines()[-1][:80], "", "", "", ""]
            )
            continue
        low, high = r["tokens_per_s_quartiles"]
        ratio = "-" if r["ratio_to_adamw"] is None else f"{r['ratio_to_adamw']:.2f}"
        lines.append(
            [
                r["size"],
                r["variant"],
                f"{r['tokens_per_s']:.0f} ({low:.0f}-{high:.0f})",
                ratio,
                f"{1e3 * r['refresh_cost_per_step_s']:.1f}",
                f"{1e3 * r['median_step_s']:.1f}",
                f"{r['peak_mib']:.0f}",
            ]
        )
    batch, seq = args.tokens
    anchor = ", ".join(f"{k} {v}" for k, v in PUBLISHED_1B.items())
    return (
        f"token batch {batch}x{seq}, {args.precision}, {args.steps} timed steps after {args.warmup}\n\n"
        + markdown_table(header, lines)
        + f"\n\nGaLore's published LLaMA 1B tokens/s at token batch 256 on one GPU: {anchor} "
        "(8-bit GaLore 0.88x AdamW). Target on a GPU: randomized refreshes with stagger >= 0.95x AdamW."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["default", "60m"], choices=sorted(SIZES))
    parser.add_argument("--variants", nargs="+", default=None, help="default: every variant (+compile as documented)")
    parser.add_argument("--tokens", default=None, help="micro-batch x sequence (default: 4x128 on a CPU, 8x256 on GPU)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (two or more refreshes in them)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (and compilation)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every variant")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--child-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repetition, 3 steps (seconds per child)")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = str(pick_device(args.device))
    if args.quick:
        args.sizes, args.repeats, args.steps, args.warmup = ["tiny"], 1, 4, 1
        args.tokens = args.tokens or "2x32"
    args.tokens = args.tokens or ("8x256" if args.device.startswith("cuda") else "4x128")
    try:
        args.tokens = tuple(int(part) for part in args.tokens.lower().split("x"))
        assert len(args.tokens) == 2
    except (ValueError, AssertionError):
        parser.error(f"--tokens {args.tokens!r}: accepted: BATCHxSEQ, e.g. 4x128")
    if args.steps < 2 or args.repeats < 1 or args.warmup < 1:
        parser.error("--steps >= 2, --repeats >= 1 and --warmup >= 1")
    all_variants = list(VARIANTS)
    compiled = all_variants if args.device.startswith("cuda") else list(COMPILED_ON_CPU)
    all_variants += [f"{v}+compile" for v in compiled]
    unknown = sorted(set(args.variants or ()) - set(all_variants))
    if unknown:
        parser.error(f"--variants {unknown}; accepted: {', '.join(all_variants)}")
    args.variants = args.variants or all_variants
    tokens = "x".join(map(str, args.tokens))
    args.forward = ["--tokens", tokens, "--precision", args.precision, "--steps", str(args.steps)]
    args.forward += ["--warmup", str(args.warmup), "--device", args.device]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        torch.set_num_threads(int(os.environ.get("THROUGHPUT_THREADS", torch.get_num_threads())))
        print("RESULT " + json.dumps(child(*args.child, args)), flush=True)
        return
    meta = run_metadata(pick_device(args.device), {k: str(v) for k, v in vars(args).items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []

    def write(final: bool) -> list[dict[str, Any]]:
        """The results so far (after every child: a run cut off still leaves what it measured)."""
        done = [
            (size, variant)
            for size in args.sizes
            for variant in args.variants
            if any(r["size"] == size and r["variant"] == variant for r in runs)
        ]
        rows = summarize(runs, list(dict.fromkeys(s for s, _ in done)), list(dict.fromkeys(v for _, v in done)))
        rows = [row for row in rows if (row["size"], row["variant"]) in done]
        text = report(rows, args)
        args.out.write_text(json.dumps({"meta": meta, "complete": final, "rows": rows, "runs": runs}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")
        if final:
            print(text)
        return rows

    for repeat in range(args.repeats):
        for size in args.sizes:
            for variant in args.variants:
                result = {**run_child(size, variant, args), "repeat": repeat, "size": size, "variant": variant}
                runs.append(result)
                state = "error" if "error" in result else f"{result['tokens_per_s']:.0f} tokens/s"
                print(f"[{repeat}] {size} {variant}: {state} ({result['child_seconds']} s)", flush=True)
                write(final=False)
    rows = write(final=True)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
