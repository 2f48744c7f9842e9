"""Optimizer-state precision benchmark: fp32 vs bf16 vs 8-bit moments, low-rank and plain AdamW, side by side.

Three measurements per variant (``lowrank`` and ``adamw`` x ``fp32``, ``bf16``, ``8bit``):

* step time: ``optimizer.step()`` alone on the weight shapes of a LLaMA config (default: c4_60m, rank 128), with
  fixed synthetic gradients (no forward/backward). All variants live in one process and are stepped round-robin
  (v1, v2, ..., v1, v2, ...), so machine noise hits them alike; the median of the repeats is reported. Subspace
  refreshes are excluded: ``update_gap`` is huge and an untimed warm-up step creates the bases.
* state bytes: after the warm-up, ``LowRankOptimizer.state_bytes()`` or, for the plain optimizers, the bytes of
  every state tensor with at least one dimension (step counters excluded).
* peak memory of a short training run (forward, backward, step on random tokens), each variant in its own child
  process (this script with ``--child``): peak RSS on a CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated``
  on a GPU. Default model: c4_60m shapes, seq 128, batch 2 (``--train-model recipe``: configs/default.yaml's model,
  vocab 4096, hidden 128, 4 layers, seq 128, batch 16, whose optimizer states are too small to show in a peak RSS).

Ratios are relative to the fp32 variant of the same family. Usage::

    python bench/state_precision.py                  # c4_60m shapes, ~4 minutes on 2 CPU cores
    python bench/state_precision.py --quick          # tiny shapes, seconds (the test runs this)
    python bench/state_precision.py --model 130m --train-model 60m --out bench/results/sp_130m.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lowrank.factory import build_optimizer
from lowrank.optimizer import LowRankOptimizer
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss, llama_preset

from _common import (
    current_rss_bytes,
    markdown_table,
    median,
    mib,
    peak_rss_bytes,
    pick_device,
    quartiles,
    run_metadata,
    timed,
)

FAMILIES = ("lowrank", "adamw")
PRECISIONS = ("fp32", "bf16", "8bit")
VARIANTS = tuple(f"{family}-{precision}" for family in FAMILIES for precision in PRECISIONS)
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_heads=4, num_layers=2, max_seq_len=64)
# Step-time shapes: name -> (config, rank). 60m / 130m: docs/reference.md.
STEP_MODELS: dict[str, tuple[LlamaConfig, int]] = {
    "tiny": (LlamaConfig(**_TINY), 16),
    "60m": (llama_preset("60m"), 128),
    "130m": (llama_preset("130m"), 256),
}
# Training models of the peak-memory children: name -> (config, rank, seq_len, batch).
TRAIN_MODELS: dict[str, tuple[LlamaConfig, int, int, int]] = {
    "tiny": (LlamaConfig(**{**_TINY, "max_seq_len": 32}), 16, 32, 4),
    "recipe": (LlamaConfig(4096, 128, 344, 4, 4, 128), 32, 128, 16),  # configs/default.yaml
    "60m": (llama_preset("60m"), 128, 128, 2),  # c4_60m shapes, batch 2: the states are a visible share of the peak
}
# (target name, numerator variant, denominator variant, measured column, upper limit, note)
TARGETS = (
    ("8-bit low-rank step time", "lowrank-8bit", "lowrank-fp32", "step_ratio", 2.0, "bitsandbytes on CPU: ~7x"),
    ("8-bit low-rank state bytes", "lowrank-8bit", "lowrank-fp32", "state_ratio", 0.30, ""),
)
COLUMNS = (
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
)


def optimizer_config(variant: str, rank: int, update_gap: int) -> dict[str, Any]:
    name, precision = variant.split("-")
    return {
        "name": name,
        "lr": 1e-3,
        "state_precision": precision,
        "lowrank": {"rank": rank, "seed": 0},
        "refresh": {"update_gap": update_gap},
    }


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer state held in tensors with at least one dimension (moments, bases, quantisation scales)."""
    if isinstance(optimizer, LowRankOptimizer):
        return optimizer.state_bytes()
    return sum(
        v.numel() * v.element_size()
        for entry in optimizer.state.values()
        for v in entry.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


# ------------------------------------------------------------------------------------------------- step time
def measure_steps(model_name: str, device: torch.device, repeats: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Step time and state bytes of every variant, stepped round-robin in this process."""
    config, rank = STEP_MODELS[model_name]
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}
    generator = torch.Generator().manual_seed(0)
    # Fixed synthetic gradients, shared by every variant (no optimizer writes into a gradient).
    grads = {name: (torch.randn(shape, generator=generator) * 1e-2).to(device) for name, shape in shapes.items()}
    runs = {}
    for variant in VARIANTS:
        with torch.device(device):
            model = Llama(config)
        optimizer = build_optimizer(model, optimizer_config(variant, rank, update_gap=10**9))
        table = optimizer.group_table
        for name, param in model.named_parameters():
            param.grad = grads[name]
        optimizer.step()  # untimed: creates the states and (low-rank) the bases; no refresh after this one
        runs[variant] = (model, optimizer, table)
    for _ in range(warmup):
        for _, optimizer, _ in runs.values():
            optimizer.step()
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant, (_, optimizer, _) in runs.items():
            times[variant].append(timed(optimizer.step, device))
    return {
        variant: {
            "step_median_s": median(times[variant]),
            "step_quartiles_s": quartiles(times[variant]),
            "step_times_s": times[variant],
            "state_bytes": state_bytes(optimizer),
            "estimated_state_bytes": table.state_bytes(),
        }
        for variant, (_, optimizer, table) in runs.items()
    }


# ----------------------------------------------------------------------------------------------- peak memory
def child_main(variant: str, train_model: str, steps: int, device: torch.device) -> dict[str, Any]:
    """One short training run of ``variant`` (this process only); returns its peak memory."""
    config, rank, seq_len, batch = TRAIN_MODELS[train_model]
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = current_rss_bytes()  # interpreter + torch, before any model memory
    with torch.device(device):
        model = Llama(config)
    optimizer = build_optimizer(model, optimizer_config(variant, rank, update_gap=200))
    times, loss = [], torch.zeros(())

    def train_step() -> None:
        nonlocal loss
        tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
        loss = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps):
        times.append(timed(train_step, device))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return {
        "variant": variant,
        "train_peak_bytes": peak,
        "train_baseline_bytes": baseline,
        "train_increase_bytes": peak - baseline,
        "train_step_median_s": median(times[1:] or times),
        "train_final_loss": float(loss.detach()),
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
    }


def run_children(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    """One child process per variant, ``args.jobs`` at a time (each measures only its own memory)."""
    results: dict[str, dict[str, Any]] = {}
    pending = list(VARIANTS)
    running: list[tuple[str, subprocess.Popen[str]]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            variant = pending.pop(0)
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                variant,
                "--train-model",
                args.train_model,
                "--train-steps",
                str(args.train_steps),
                "--device",
                str(device),
                "--threads",
                str(args.threads),
            ]
            running.append(
                (variant, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            )
        variant, child = running.pop(0)
        try:
            stdout, stderr = child.communicate(timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            print(f"child {variant} failed (exit {child.returncode}):\n{stderr[-2000:]}", file=sys.stderr)
            results[variant] = {"train_error": stderr[-2000:] or f"exit {child.returncode}"}
        else:
            results[variant] = json.loads(lines[-1][len("RESULT ") :])
    return results


# ------------------------------------------------------------------------------------------------ reporting
def assemble(steps: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        name, precision = variant.split("-")
        ref = steps[f"{name}-fp32"]
        row = {"variant": variant, "name": name, "state_precision": precision, **steps[variant]}
        row["step_ratio"] = row["step_median_s"] / ref["step_median_s"]
        row["state_ratio"] = row["state_bytes"] / ref["state_bytes"]
        for key in COLUMNS:
            row.setdefault(key, train[variant].get(key))
        row["train_error"] = train[variant].get("train_error")
        rows.append(row)
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_variant = {row["variant"]: row for row in rows}
    return [
        {
            "target": name,
            "variant": num,
            "relative_to": den,
            "measured": by_variant[num][column],
            "limit": limit,
            "ok": by_variant[num][column] <= limit,
            "note": note,
        }
        for name, num, den, column, limit, note in TARGETS
    ]


def report(rows: list[dict[str, Any]], targets: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    header = (
        "variant",
        "step ms (IQR)",
        "step x fp32",
        "state MiB",
        "state x fp32",
        "train peak MiB",
        "train +MiB",
        "train step ms",
    )
    body = [
        (
            r["variant"],
            f"{r['step_median_s'] * 1e3:.1f} ({r['step_quartiles_s'][0] * 1e3:.0f}-"
            f"{r['step_quartiles_s'][1] * 1e3:.0f})",
            f"{r['step_ratio']:.2f}x",
            mib(r["state_bytes"]),
            f"{r['state_ratio']:.3f}x",
            mib(r["train_peak_bytes"]),
            mib(r["train_increase_bytes"]),
            "-" if r["train_step_median_s"] is None else f"{r['train_step_median_s'] * 1e3:.1f}",
        )
        for r in rows
    ]
    goals = [
        (t["target"], f"{t['measured']:.3f}x", f"<= {t['limit']}x", "PASS" if t["ok"] else "FAIL", t["note"])
        for t in targets
    ]
    args = meta["args"]
    _, _, seq_len, batch = TRAIN_MODELS[args["train_model"]]
    return "\n\n".join(
        [
            f"State precision: device {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
            f"{meta['threads']} threads / {meta['cpu_count']} CPUs, {meta['date']}\n"
            f"step time: {args['model']} shapes, {args['repeats']} round-robin repeats (median); "
            f"train: {args['train_model']} model, batch {batch} x seq {seq_len}, {args['train_steps']} steps, "
            f"peak memory ({'peak RSS' if meta['device'] == 'cpu' else 'max allocated'}) per child process; "
            "+MiB: above the child's baseline before the model was built",
            markdown_table(header, body),
            markdown_table(("target", "measured", "limit", "result", "note"), goals),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(STEP_MODELS), default="60m", help="weight shapes of the step timing")
    parser.add_argument(
        "--train-model",
        choices=sorted(TRAIN_MODELS),
        default="60m",
        help="model of the peak-memory training runs (recipe: configs/default.yaml's, whose optimizer "
        "states are ~2%% of the peak, below RSS noise)",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed round-robin rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the state-creating step")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps per peak-memory child")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--jobs", type=int, default=1, help="peak-memory children run at once (2 with --quick)")
    parser.add_argument("--child-timeout", type=float, default=600.0, help="seconds per peak-memory child")
    parser.add_argument("--out", default="bench/results/state_precision.json", help="JSON results file")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, 3 repeats, 2 training steps, 1 thread (seconds)"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.train_model, args.repeats, args.warmup, args.train_steps = "tiny", "tiny", 3, 1, 2
        args.jobs = 2
        args.threads = 1  # tiny matrices: a second OpenMP thread only adds contention on a busy machine
    if args.repeats < 1 or args.train_steps < 1 or args.warmup < 0 or args.threads < 1 or args.jobs < 1:
        parser.error("--repeats, --train-steps, --threads and --jobs must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.child:
        print("RESULT " + json.dumps(child_main(args.child, args.train_model, args.train_steps, device)))
        return
    meta = run_metadata(device, {k: v for k, v in vars(args).items() if k != "child"})
    train = run_children(args, device)  # before the parent allocates its step-time models
    steps = measure_steps(args.model, device, args.repeats, args.warmup)
    rows = assemble(steps, train)
    targets = check_targets(rows)
    print(report(rows, targets, meta))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config, rank = STEP_MODELS[args.model]
    train_config, train_rank, seq_len, batch = TRAIN_MODELS[args.train_model]
    models = {
        "step": {"config": vars(config), "rank": rank},
        "train": {"config": vars(train_config), "rank": train_rank, "seq_len": seq_len, "batch": batch},
    }
    out.write_text(
        json.dumps(
            {"meta": meta, "models": models, "columns": list(COLUMNS), "rows": rows, "targets": targets}, indent=2
        )
        + "\n"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
