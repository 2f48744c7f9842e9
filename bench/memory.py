"""Training-memory benchmark (skeleton): measured peak memory of a few real training steps against
``lowrank.memory.estimate_memory``, one variant per fresh process.

Each variant (BF16-style AdamW, 8-bit AdamW, 8-bit low-rank, 8-bit low-rank with per-layer updates) runs in a child
process (this script with ``--child``), which records the baseline (RSS before the model is built on a CPU; on a
GPU the allocator starts at zero), builds the model, optimizer and data, runs ``--steps`` training steps and
reports the peak: ``ru_maxrss`` minus the baseline on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU. The
estimate is printed beside it with the ratio measured / estimated. A CPU peak RSS also holds the allocator's
caches and the transient buffers of backward, which the estimator leaves out.

    python bench/memory.py --quick          # tiny shapes, seconds (the test runs this)
    python bench/memory.py --model 60m      # c4_60m shapes (not yet calibrated: the 60M-1B rows are to come)
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
from lowrank.memory import ModelShape, OptimizerShape, TrainingShape, estimate_memory
from lowrank.per_layer import enable_per_layer
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss, llama_preset

from _common import current_rss_bytes, markdown_table, mib, peak_rss_bytes, pick_device, run_metadata

# name -> (optimizer name, state precision, per-layer updates)
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "adamw-bf16": ("adamw", "bf16", False),
    "adamw-8bit": ("adamw", "8bit", False),
    "lowrank-8bit": ("lowrank", "8bit", False),
    "lowrank-8bit-per-layer": ("lowrank", "8bit", True),
}
# name -> (config, rank, seq_len, micro-batch)
MODELS: dict[str, tuple[LlamaConfig, int, int, int]] = {
    "tiny": (LlamaConfig(512, 64, 172, 4, 2, 32), 16, 32, 4),
    "60m": (llama_preset("60m"), 128, 256, 4),
}
COLUMNS = ("variant", "estimated_bytes", "measured_bytes", "ratio", "error")


def variant_shapes(variant: str, model: str, dtype: torch.dtype) -> tuple[ModelShape, OptimizerShape, TrainingShape]:
    name, precision, per_layer = VARIANTS[variant]
    config, rank, seq_len, batch = MODELS[model]
    optimizer = OptimizerShape(name=name, rank=rank, state_precision=precision)
    training = TrainingShape(batch, seq_len, dtype, config.activation_checkpointing, per_layer)
    return ModelShape.from_config(config), optimizer, training


def child_main(variant: str, model: str, steps: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Runs ``steps`` training steps; returns the peak bytes above the baseline."""
    name, precision, per_layer = VARIANTS[variant]
    config, rank, seq_len, batch = MODELS[model]
    baseline = current_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    net = Llama(config).to(device=device, dtype=dtype)
    settings: dict[str, Any] = {"name": name, "lr": 1e-3, "state_precision": precision}
    if name == "lowrank":
        settings["lowrank"] = {"rank": rank}
    optimizer = build_optimizer(net, settings)
    updater = enable_per_layer(optimizer) if per_layer else None
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    for _ in range(steps):
        causal_lm_loss(net(ids[:, :-1]), ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if updater is not None:
        updater.remove()
    if device.type == "cuda":
        return {"measured_bytes": torch.cuda.max_memory_allocated(device)}
    return {"measured_bytes": peak_rss_bytes() - baseline}


def run_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--model", args.model, "--steps", str(args.steps)]
    command += ["--device", args.device, "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "error": None}
    return {"measured_bytes": None, "error": (done.stderr or done.stdout)[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps (seconds)")
    parser.add_argument("--model", choices=sorted(MODELS), default="60m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--child-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps = "tiny", 2
    device, dtype = pick_device(args.device), getattr(torch, args.dtype)
    args.device = str(device)
    if args.child:
        print("RESULT " + json.dumps(child_main(args.child, args.model, args.steps, device, dtype)))
        return
    rows = []
    for variant in VARIANTS:
        estimate = estimate_memory(*variant_shapes(variant, args.model, dtype))
        child = run_child(variant, args)
        measured = child["measured_bytes"]
        ratio = None if measured is None else round(measured / estimate.total, 3)
        row = {"variant": variant, "estimated_bytes": estimate.total, "measured_bytes": measured, "ratio": ratio}
        rows.append({**row, "error": child["error"], "estimate": estimate.as_dict()})
    header = ["variant", "estimated MiB", "measured MiB", "measured / estimated"]
    table = markdown_table(
        header, [[r["variant"], mib(r["estimated_bytes"]), mib(r["measured_bytes"]), str(r["ratio"])] for r in rows]
    )
    print(table)
    meta = run_metadata(device, {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "columns": list(COLUMNS), "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
