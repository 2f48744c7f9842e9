"""Backward plus optimizer step with projected gradients against the ordinary path, on LLaMA shapes.

For each model (default: 60m at rank 128 and 130m at rank 256) two copies of the recipe's model with the same
weights and the same low-rank optimizer (importance sampling, 8-bit states or not), one ordinary, one with
``lowrank.projected.enable_projected_gradients``. After an untimed first step (every weight's first basis: both
paths form every full gradient there) and ``--warmup`` untimed rounds, the two are stepped round-robin (ordinary,
projected, ordinary, ...) so that machine noise hits them alike; each round times the forward pass and, separately,
backward plus the optimizer step (the part projected gradients change: R = dy^T (x B) or (dy B)^T x instead of
G = dy^T x and its projection, the step without projecting). No refresh falls in the timed rounds (``update_gap`` is
larger than the run); a refresh step costs what the ordinary path's does, plus re-projecting the refreshing slice.

Reports the median and the quartiles of each and the ratio projected / ordinary of the medians (target on a GPU:
<= 1.00; on a 2-core CPU the figures are informational, load moves them 2-5x). Usage::

    python bench/projected_step.py                  # 60m + 130m, 10 rounds
    python bench/projected_step.py --quick          # tiny shapes, seconds (a test runs this)
    python bench/projected_step.py --models 60m --tokens 8x256 --precision 8bit --out /tmp/projected.json

Results: JSON (``--out``) and the table as markdown beside it (``.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from lowrank.factory import build_optimizer
from lowrank.projected import enable_projected_gradients
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss, llama_preset

from _common import markdown_table, median, pick_device, quartiles, run_metadata, timed

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}
QUICK = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_heads=4, num_layers=2, max_seq_len=64)
VARIANTS = ("ordinary", "projected")


def _settings(rank: int, precision: str, steps: int) -> dict[str, Any]:
    return {
        "name": "lowrank",
        "lr": 1e-3,
        "state_precision": precision,
        "lowrank": {"rank": rank, "selector": "importance"},
        "refresh": {"update_gap": steps + 10},  # only the first step refreshes
    }


def measure_model(
    name: str, config: LlamaConfig, rank: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Times of ``args.repeats`` round-robin rounds of both variants on one model."""
    batch, seq = args.tokens
    torch.manual_seed(0)
    base = Llama(config).to(device)
    steps = 1 + args.warmup + args.repeats
    settings = _settings(rank, args.precision, steps)
    runs = {}
    for variant in VARIANTS:
        model = copy.deepcopy(base)
        optimizer = build_optimizer(model, settings)
        handle = enable_projected_gradients(model, optimizer) if variant == "projected" else None
        runs[variant] = (model, optimizer, handle)
    del base
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator).to(device)
    times: dict[str, dict[str, list[float]]] = {v: {"forward": [], "backward_step": []} for v in VARIANTS}

    for round_index in range(steps):
        for variant in VARIANTS:
            model, optimizer, _ = runs[variant]
            holder: dict[str, torch.Tensor] = {}

            def forward(model: torch.nn.Module = model, holder: dict = holder) -> None:
                holder["loss"] = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])

            def backward_step(optimizer: torch.optim.Optimizer = optimizer, holder: dict = holder) -> None:
                holder.pop("loss").backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            forward_s = timed(forward, device)
            backward_s = timed(backward_step, device)
            if round_index >= 1 + args.warmup:
                times[variant]["forward"].append(forward_s)
                times[variant]["backward_step"].append(backward_s)
    for _, _, handle in runs.values():
        if handle is not None:
            handle.remove()
    row: dict[str, Any] = {"model": name, "rank": rank, "tokens": f"{batch}x{seq}", "precision": args.precision}
    for variant in VARIANTS:
        for part, values in times[variant].items():
            row[f"{variant}_{part}_median_s"] = median(values)
            row[f"{variant}_{part}_quartiles_s"] = quartiles(values)
            row[f"{variant}_{part}_s"] = values
    for part in ("forward", "backward_step"):
        row[f"ratio_{part}"] = row[f"projected_{part}_median_s"] / row[f"ordinary_{part}_median_s"]
    return row


def report(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], variant: str, part: str) -> str:
        low, high = row[f"{variant}_{part}_quartiles_s"]
        return f"{1e3 * row[f'{variant}_{part}_median_s']:.1f} ({1e3 * low:.1f}-{1e3 * high:.1f})"

    header = [
        "model",
        "rank",
        "tokens",
        "states",
        "part",
        "ordinary ms (IQR)",
        "projected ms (IQR)",
        "projected / ordinary",
    ]
    lines = [
        [r["model"], str(r["rank"]), r["tokens"], r["precision"], part, cell(r, "ordinary", part)]
        + [cell(r, "projected", part), f"{r[f'ratio_{part}']:.2f}"]
        for r in rows
        for part in ("backward_step", "forward")
    ]
    return markdown_table(header, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["60m", "130m"], choices=sorted(RANKS))
    parser.add_argument("--tokens", default="1x256", help="micro-batch x sequence length (default 1x256)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "8bit"], help="optimizer state precision")
    parser.add_argument("--repeats", type=int, default=10, help="timed round-robin rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first step")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results/projected_step.json"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (seconds)")
    args = parser.parse_args(argv)
    try:
        batch, seq = (int(part) for part in args.tokens.lower().split("x"))
    except ValueError:
        parser.error(f"--tokens {args.tokens!r}: accepted: BATCHxSEQ, e.g. 1x256")
    args.tokens = (batch, seq)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: accepted: an integer >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.tokens = 3, (2, 32)
        models = [("quick", QUICK, 16)]
    else:
        models = [(name, llama_preset(name), RANKS[name]) for name in args.models]
    rows = [measure_model(name, config, rank, args, device) for name, config, rank in models]
    text = report(rows)
    print(text)
    meta = run_metadata(device, {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
