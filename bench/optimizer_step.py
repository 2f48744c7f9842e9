"""Optimizer step benchmark: low-rank AdamW against its floor, torch AdamW and galore-torch, plus refresh cost.

Three measurements:

* step time, on the weight shapes of LLaMA configs (default: 60m at rank 128 and 130m at rank 256, fp32), with
  fixed synthetic gradients (no forward/backward). Variants: ``adamw`` (``torch.optim.AdamW(foreach=True)`` on every
  parameter); ``lowrank-<selector>`` (``build_optimizer`` with each registered selector); ``galore-torch`` (the
  published package's ``GaLoreAdamW``, param groups with rank / update_proj_gap / scale / proj_type 'std'; skipped
  with a note when ``galore_torch`` does not import); and ``floor``: the work no low-rank AdamW can avoid, timed
  alone: the two projection matmuls per low-rank matrix (R = G B, then W += alpha * U B^T, GaLore's side rule) and
  one ``torch.optim.AdamW(foreach=True)`` step over the projected tensors and the plain group (embeddings, head,
  norms). Refreshes are excluded: ``update_gap`` is huge and an untimed warm-up step creates the bases. All variants
  of a model live in one process and are stepped round-robin (v1, v2, ..., v1, v2, ...), so machine noise hits them
  alike; the median and quartiles of the repeats are reported.
* state bytes per variant: ``LowRankOptimizer.state_bytes()``; for the others the bytes of every state tensor with
  at least one dimension (galore-torch's basis, held in a projector object, included).
* refresh time per distinct weight shape: ``make_selector(name).select(oriented_grad, rank, generator)``, the public
  selector path the optimizer's ``resample`` runs, for every selector, round-robin, on a fixed Gaussian gradient. The
  1B shapes (2048x2048, 5461x2048, 2048x5461) at ranks 128 (the target), 256 and 512, and each 60m / 130m shape at
  its rank; per-layer totals weight each shape by its count in one decoder layer (4 attention, 2 + 1 MLP). The
  exact rules (full SVD: its cost does not depend on r) are timed at each model's first rank only, unless
  ``--exact-all-ranks``.

Targets (measured beside each): low-rank step <= 1.2x its floor and <= 1.0x galore-torch (worst selector of each
model); randomized refresh >= 10x cheaper than the full-SVD rule on one 1B decoder layer at rank 128. Usage::

    python bench/optimizer_step.py                    # 60m + 130m steps, 1B refreshes: 20+ minutes on 2 CPU cores
    python bench/optimizer_step.py --quick            # tiny shapes, seconds (the test runs this)
    PYTHONPATH=/tmp/gt_site python bench/optimizer_step.py   # with galore-torch installed to a side directory
    python bench/optimizer_step.py --models 60m --refresh-models 60m --no-galore --out /tmp/step.json

Results: the JSON (``--out``) and the same tables as markdown beside it (``.md``). The three measurements share the
shapes, variants and report of one run, hence one file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import torch

from lowrank.factory import build_optimizer
from lowrank.optimizer import LowRankOptimizer
from lowrank.projector import add_back_projected_, orient, project, resolve_side
from lowrank.randomness import draw_generator
from lowrank.selectors import SELECTORS, make_selector
from lowrank_recipes.recipes.model import Llama, LlamaConfig, llama_preset

from _common import markdown_table, median, mib, pick_device, quartiles, run_metadata, timed

SELECTOR_NAMES = tuple(SELECTORS)  # every registered selector, in registry order
LOWRANK_VARIANTS = tuple(f"lowrank-{name}" for name in SELECTOR_NAMES)
STEP_VARIANTS = ("adamw", *LOWRANK_VARIANTS, "galore-torch", "floor")
# The exact rule each selector is measured against: the exact rules themselves, the randomized ones the rule they
# approximate; random (and any other rule without an exact twin) against dominant, GaLore's rule.
EXACT_RULES = ("dominant", "importance")
_APPROXIMATES = {"randomized_dominant": "dominant", "randomized_importance": "importance"}
FULL_RULE = {name: name if name in EXACT_RULES else _APPROXIMATES.get(name, "dominant") for name in SELECTOR_NAMES}
LR, ALPHA, BETAS, EPS = 1e-3, 0.25, (0.9, 0.999), 1e-6
_TINY = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_heads=4, num_layers=2, max_seq_len=64)
# name -> (config, rank of the step timing, refresh ranks: the first is the target's). docs/reference.md.
MODELS: dict[str, tuple[LlamaConfig, int, tuple[int, ...]]] = {
    "tiny": (_TINY, 16, (16, 32)),
    "60m": (llama_preset("60m"), 128, (128,)),
    "130m": (llama_preset("130m"), 256, (256,)),
    "1b": (llama_preset("1b"), 512, (128, 256, 512)),
}
REFRESH_TARGET_MODELS = ("1b", "tiny")  # the refresh target is about the 1B shapes; tiny exercises it under --quick
STEP_COLUMNS = (
    "model",
    "variant",
    "rank",
    "step_median_s",
    "step_quartiles_s",
    "floor_ratio",
    "galore_ratio",
    "adamw_ratio",
    "state_bytes",
    "state_ratio",
)
REFRESH_COLUMNS = (
    "model",
    "shape",
    "side",
    "per_layer",
    "rank",
    "selector",
    "timed_rank",
    "median_s",
    "quartiles_s",
    "speedup",
)
LAYER_COLUMNS = ("model", "rank", "selector", "layer_s", "speedup")


def load_galore() -> tuple[type | None, str]:
    """galore-torch's GaLoreAdamW and its version, or (None, why it is missing)."""
    try:
        from galore_torch import GaLoreAdamW
    except Exception as err:  # ImportError, or its own imports (transformers, bitsandbytes) failing
        return None, f"galore-torch not importable ({type(err).__name__}: {err}); install the `bench` extra"
    try:
        version = importlib.metadata.version("galore-torch")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return GaLoreAdamW, version


def tensor_bytes(values: Any) -> int:
    return sum(v.numel() * v.element_size() for v in values if torch.is_tensor(v) and v.dim() > 0)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer state in tensors with at least one dimension (galore-torch's projector basis included)."""
    if isinstance(optimizer, (LowRankOptimizer, Floor)):
        return optimizer.state_bytes()
    total = 0
    for entry in optimizer.state.values():
        total += tensor_bytes(entry.values())
        projector = entry.get("projector")
        total += tensor_bytes([getattr(projector, "ortho_matrix", None)])
    return total


class Floor:
    """The unavoidable work of one low-rank AdamW step: 2 matmuls per low-rank matrix and one foreach AdamW step.

    ``lowrank`` holds (weight, basis (d, r), side) triples; the projected tensors get their gradients written by the
    first matmul, torch's foreach AdamW turns them into updates, the second matmul adds those to the weights.
    """

    def __init__(self, lowrank: list[tuple[torch.Tensor, torch.Tensor, str]], plain: list[torch.Tensor]) -> None:
        self.lowrank = lowrank
        self.low = [torch.zeros_like(project(w, b, side)) for w, b, side in lowrank]
        for low in self.low:
            low.grad = torch.zeros_like(low)
        self.adam = torch.optim.AdamW([*self.low, *plain], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=True)

    def state_bytes(self) -> int:
        """The AdamW moments (projected and plain) plus the bases, as a low-rank AdamW holds them."""
        adam = sum(tensor_bytes(entry.values()) for entry in self.adam.state.values())
        return adam + tensor_bytes([basis for _, basis, _ in self.lowrank])

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_zero_(self.low)  # the update lands in the zeroed tensor
        for (weight, basis, side), low in zip(self.lowrank, self.low):
            if side == "right":
                torch.matmul(weight.grad, basis, out=low.grad)  # R = G B (m, r)
            else:
                torch.matmul(basis.T, weight.grad, out=low.grad)  # R = B^T G (r, n)
        self.adam.step()
        for (weight, basis, side), low in zip(self.lowrank, self.low):
            add_back_projected_(weight, low, basis, side, ALPHA)


# ------------------------------------------------------------------------------------------------- step time
def build_variant(
    variant: str,
    config: LlamaConfig,
    rank: int,
    device: torch.device,
    grads: dict[str, torch.Tensor],
    galore: type | None,
    bases: dict[str, torch.Tensor],
) -> Any:
    """The optimizer (or floor) of ``variant`` on its own copy of the model, gradients attached."""
    with torch.device(device):
        model = Llama(config)
    named = dict(model.named_parameters())
    for name, param in named.items():
        param.grad = grads[name]
    if variant.startswith("lowrank-"):
        lowrank = {"rank": rank, "seed": 0, "selector": variant.removeprefix("lowrank-")}
        return build_optimizer(
            model,
            {
                "name": "lowrank",
                "lr": LR,
                "betas": BETAS,
                "eps": EPS,
                "lowrank": lowrank,
                "refresh": {"update_gap": 10**9},
            },
        )
    if variant == "adamw":
        return torch.optim.AdamW(named.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=True)
    # floor and galore-torch: the same low-rank parameters (and, for the floor, bases) as lowrank-dominant's.
    low = [name for name in named if name in bases]
    plain = [param for name, param in named.items() if name not in bases]
    if variant == "floor":
        sides = {name: resolve_side(named[name].shape) for name in low}
        return Floor([(named[n], bases[n], sides[n]) for n in low], plain)
    galore_group = {"rank": rank, "update_proj_gap": 10**9, "scale": ALPHA, "proj_type": "std"}
    groups = [{"params": plain}, {"params": [named[n] for n in low], **galore_group}]
    return galore(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, no_deprecation_warning=True)


def measure_steps(
    model_name: str, device: torch.device, repeats: int, warmup: int, galore: type | None
) -> list[dict[str, Any]]:
    """Step time and state bytes of every variant on ``model_name``'s shapes, stepped round-robin."""
    config, rank, _ = MODELS[model_name]
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}
    generator = torch.Generator().manual_seed(0)
    # Fixed synthetic gradients shared by every variant (none writes into a gradient).
    grads = {name: (torch.randn(shape, generator=generator) * 1e-2).to(device) for name, shape in shapes.items()}
    torch.manual_seed(0)
    variants = [v for v in STEP_VARIANTS if v != "galore-torch" or galore is not None]
    runs: dict[str, Any] = {}
    bases: dict[str, torch.Tensor] = {}
    for variant in variants:
        runs[variant] = build_variant(variant, config, rank, device, grads, galore, bases)
        if variant != "floor":
            runs[variant].step()  # untimed: creates the states and the bases; no refresh after this one
        if variant == "lowrank-dominant":  # the floor projects on the same bases
            opt = runs[variant]
            bases = {
                n: opt.state[p]["lowrank_basis"]
                for g in opt.param_groups
                if g["rank"]
                for n, p in zip(g["param_names"], g["params"])
            }
    runs["floor"].step()
    for _ in range(warmup):
        for optimizer in runs.values():
            optimizer.step()
    times: dict[str, list[float]] = {variant: [] for variant in runs}
    for _ in range(repeats):
        for variant, optimizer in runs.items():
            times[variant].append(timed(optimizer.step, device))
    rows = [
        {
            "model": model_name,
            "variant": v,
            "rank": None if v == "adamw" else rank,
            "step_median_s": median(times[v]),
            "step_quartiles_s": quartiles(times[v]),
            "step_times_s": times[v],
            "state_bytes": state_bytes(runs[v]),
        }
        for v in runs
    ]
    ref = {row["variant"]: row for row in rows}
    for row in rows:
        for column, other in (("floor_ratio", "floor"), ("galore_ratio", "galore-torch"), ("adamw_ratio", "adamw")):
            row[column] = row["step_median_s"] / ref[other]["step_median_s"] if other in ref else None
        row["state_ratio"] = row["state_bytes"] / ref["adamw"]["state_bytes"]
    return rows


# ---------------------------------------------------------------------------------------------- refresh time
def layer_shapes(config: LlamaConfig) -> list[tuple[tuple[int, int], int]]:
    """Distinct low-rank weight shapes (out, in) of one decoder layer with their counts."""
    hidden, inter = config.hidden_size, config.intermediate_size
    return [((hidden, hidden), 4), ((inter, hidden), 2), ((hidden, inter), 1)]


def measure_refresh(model_name: str, device: torch.device, repeats: int, exact_all_ranks: bool) -> list[dict[str, Any]]:
    """Seconds per ``select`` call for every selector, shape and refresh rank of ``model_name``, round-robin.

    The exact rules (dominant, importance) compute the full thin SVD whatever r is (r only slices it), so unless
    ``exact_all_ranks`` they are timed at the first (target) rank and that time stands for the other ranks too
    (``timed_rank`` in the row says which rank was timed): full SVDs of the 1B shapes take seconds each.
    """
    config, _, ranks = MODELS[model_name]
    selectors = {name: make_selector(name) for name in SELECTOR_NAMES}
    rows = []
    for shape, count in layer_shapes(config):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        side = resolve_side(shape)
        oriented = orient(grad, side)  # what the optimizer hands the selector (a transposed view for right)
        exact: dict[str, list[float]] = {}
        for rank in ranks:
            timed_now = {n: s for n, s in selectors.items() if exact_all_ranks or FULL_RULE[n] != n or rank == ranks[0]}
            times: dict[str, list[float]] = {name: [] for name in timed_now}
            for step in range(repeats):
                for name, selector in timed_now.items():
                    generator = draw_generator(0, step, f"{model_name}.{shape}")
                    times[name].append(timed(lambda: selector.select(oriented, rank, generator), device))
            if rank == ranks[0]:
                exact = {name: times[name] for name in selectors if FULL_RULE[name] == name}
            for name in selectors:
                values = times.get(name, exact.get(name))
                rows.append(
                    {
                        "model": model_name,
                        "shape": "x".join(map(str, shape)),
                        "side": side,
                        "per_layer": count,
                        "rank": rank,
                        "selector": name,
                        "timed_rank": rank if name in times else ranks[0],
                        "median_s": median(values),
                        "quartiles_s": quartiles(values),
                        "times_s": values,
                    }
                )
    full = {(r["shape"], r["rank"], r["selector"]): r["median_s"] for r in rows}
    for row in rows:
        row["speedup"] = full[(row["shape"], row["rank"], FULL_RULE[row["selector"]])] / row["median_s"]
    return rows


def layer_totals(refresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refresh seconds of one whole decoder layer per (model, rank, selector), and the speedup over the exact rule."""
    totals: dict[tuple[str, int, str], float] = {}
    for row in refresh:
        key = (row["model"], row["rank"], row["selector"])
        totals[key] = totals.get(key, 0.0) + row["per_layer"] * row["median_s"]
    return [
        {"model": m, "rank": r, "selector": s, "layer_s": t, "speedup": totals[(m, r, FULL_RULE[s])] / t}
        for (m, r, s), t in totals.items()
    ]


# ------------------------------------------------------------------------------------------------ reporting
def check_targets(steps: list[dict[str, Any]], layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step targets per model (worst selector); refresh speedups per model and rank, with a limit only at the target
    rank of the 1B shapes (``tiny`` stands in for them under --quick)."""
    targets = []
    for model in dict.fromkeys(row["model"] for row in steps):
        low = [r for r in steps if r["model"] == model and r["variant"].startswith("lowrank-")]
        for name, column, limit in (
            ("low-rank step vs floor", "floor_ratio", 1.2),
            ("low-rank step vs galore-torch", "galore_ratio", 1.0),
        ):
            if low[0][column] is None:
                continue  # galore-torch absent: noted in the results instead
            worst = max(low, key=lambda r: r[column])
            targets.append(
                {
                    "target": f"{name} ({model}, worst selector)",
                    "measured": worst[column],
                    "op": "<=",
                    "limit": limit,
                    "ok": worst[column] <= limit,
                    "note": worst["variant"],
                }
            )
    for row in layers:
        if row["selector"].startswith("randomized"):
            model, rank = row["model"], row["rank"]
            is_target = model in REFRESH_TARGET_MODELS and rank == MODELS[model][2][0]
            targets.append(
                {
                    "target": f"{row['selector']} refresh speedup ({model} layer, rank {rank})",
                    "measured": row["speedup"],
                    "op": ">=",
                    "limit": 10.0 if is_target else None,
                    "ok": row["speedup"] >= 10.0 if is_target else None,
                    "note": f"vs {FULL_RULE[row['selector']]}" + ("" if is_target else ", reported only"),
                }
            )
    return targets


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cell(value: float, speedup: float, selector: str) -> str:
    """Milliseconds, with the speedup over the exact rule for the approximations."""
    return f"{value * 1e3:.1f}" + ("" if FULL_RULE[selector] == selector else f" ({speedup:.1f}x)")


def report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    step_body = [
        (
            r["model"],
            r["variant"],
            str(r["rank"] or "-"),
            f"{_ms(r['step_median_s'])} ({_ms(r['step_quartiles_s'][0])}-{_ms(r['step_quartiles_s'][1])})",
            _ratio(r["floor_ratio"]),
            _ratio(r["galore_ratio"]),
            _ratio(r["adamw_ratio"]),
            mib(r["state_bytes"]),
            f"{r['state_ratio']:.3f}x",
        )
        for r in result["steps"]
    ]
    # Refresh tables: one row per (model, shape, rank) and per (model, rank), one column per selector.
    cells: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}
    for r in result["refresh"]:
        key = (r["model"], r["shape"], r["side"], str(r["per_layer"]), str(r["rank"]))
        cells.setdefault(key, {})[r["selector"]] = r
    refresh_body = [
        (*key, *(_cell(by[s]["median_s"], by[s]["speedup"], s) for s in SELECTOR_NAMES)) for key, by in cells.items()
    ]
    totals: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}
    for r in result["layers"]:
        totals.setdefault((r["model"], str(r["rank"])), {})[r["selector"]] = r
    layer_body = [
        (*key, *(_cell(by[s]["layer_s"], by[s]["speedup"], s) for s in SELECTOR_NAMES)) for key, by in totals.items()
    ]
    goals = [
        (
            t["target"],
            f"{t['measured']:.2f}x",
            "-" if t["limit"] is None else f"{t['op']} {t['limit']}x",
            {True: "PASS", False: "FAIL", None: "-"}[t["ok"]],
            t["note"],
        )
        for t in result["targets"]
    ]
    args = meta["args"]
    return "\n\n".join(
        [
            f"Optimizer step: device {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
            f"{meta['threads']} threads / {meta['cpu_count']} CPUs, load {meta['load_average']}, {meta['date']}; "
            f"galore-torch: {result['galore_torch']['version'] or result['galore_torch']['note']}\n"
            f"step: fp32, {args['repeats']} round-robin repeats (median, IQR), refreshes excluded; "
            "ratios are of medians",
            markdown_table(
                (
                    "model",
                    "variant",
                    "rank",
                    "step ms (IQR)",
                    "x floor",
                    "x galore-torch",
                    "x adamw",
                    "state MiB",
                    "state x adamw",
                ),
                step_body,
            ),
            f"refresh: median ms of one select() call per shape, {args['refresh_repeats']} round-robin repeats; "
            "(speedup) = the exact rule's time / this selector's (random: vs dominant)"
            + (
                ""
                if args["exact_all_ranks"]
                else "; dominant and importance (full SVD, whatever r) timed at the first rank of each model only"
            ),
            markdown_table(
                ("model", "shape", "side", "per layer", "rank", *(f"{s} ms" for s in SELECTOR_NAMES)), refresh_body
            ),
            "one decoder layer (each shape times its count): ms (speedup over the exact rule)",
            markdown_table(("model", "rank", *(f"{s} ms" for s in SELECTOR_NAMES)), layer_body),
            markdown_table(("target", "measured", "limit", "result", "note"), goals),
            *result["notes"],
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="*",
        choices=sorted(MODELS),
        default=["60m", "130m"],
        help="weight shapes of the step timing (rank: 60m 128, 130m 256)",
    )
    parser.add_argument(
        "--refresh-models",
        nargs="*",
        choices=sorted(MODELS),
        default=["1b", "60m", "130m"],
        help="shapes of the refresh timing (1b: ranks 128, 256, 512; the first is the target's)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed round-robin step rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the state-creating step")
    parser.add_argument("--refresh-repeats", type=int, default=3, help="round-robin rounds per refresh shape and rank")
    parser.add_argument(
        "--exact-all-ranks",
        action="store_true",
        help="time the full-SVD rules at every refresh rank, not only the first (their cost ignores r)",
    )
    parser.add_argument("--no-galore", action="store_true", help="skip galore-torch even when it imports")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--out", default="bench/results/optimizer_step.json", help="JSON results file (markdown: .md)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats, 1 thread (seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.refresh_models, args.repeats, args.refresh_repeats, args.threads = ["tiny"], ["tiny"], 3, 2, 1
        args.exact_all_ranks = True  # cheap at tiny shapes: every row measured
    if args.repeats < 1 or args.refresh_repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats, --refresh-repeats and --threads must be >= 1, --warmup >= 0")
    return args


def write_results(
    out: Path,
    args: argparse.Namespace,
    meta: dict[str, Any],
    galore: type | None,
    galore_info: str,
    notes: list[str],
    steps: list[dict[str, Any]],
    refresh: list[dict[str, Any]],
) -> str:
    """Writes the JSON and markdown of what was measured so far; returns the markdown."""
    layers = layer_totals(refresh)
    targets = check_targets(steps, layers)
    result = {
        "meta": meta,
        "galore_torch": {
            "available": galore is not None,
            "version": galore_info if galore else None,
            "note": None if galore else galore_info,
        },
        "models": {
            m: {"config": vars(MODELS[m][0]), "rank": MODELS[m][1], "refresh_ranks": list(MODELS[m][2])}
            for m in dict.fromkeys(args.models + args.refresh_models)
        },
        "step_columns": list(STEP_COLUMNS),
        "refresh_columns": list(REFRESH_COLUMNS),
        "layer_columns": list(LAYER_COLUMNS),
        "steps": steps,
        "refresh": refresh,
        "layers": layers,
        "targets": targets,
        "notes": notes,
    }
    text = report(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    meta = run_metadata(device, vars(args))
    galore, galore_info = (None, "--no-galore given") if args.no_galore else load_galore()
    notes = [] if galore else [f"note: galore-torch row skipped: {galore_info}"]
    if notes:
        print(notes[0], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps: list[dict[str, Any]] = []
    refresh: list[dict[str, Any]] = []
    text = ""
    # The files are rewritten after every model, so a long run that is stopped keeps what it measured.
    for model in args.models:
        steps += measure_steps(model, device, args.repeats, args.warmup, galore)
        text = write_results(out, args, meta, galore, galore_info, notes, steps, refresh)
        print(f"step timing {model} done", flush=True)
    for model in args.refresh_models:
        refresh += measure_refresh(model, device, args.refresh_repeats, args.exact_all_ranks)
        text = write_results(out, args, meta, galore, galore_info, notes, steps, refresh)
        print(f"refresh timing {model} done", flush=True)
    print(text)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
