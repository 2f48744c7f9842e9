"""Which modules a training method moves, and which matter: the SfN stethoscopes on this project's own runs.

    python bench/sfn_study.py --work-dir W --out-dir docs/results   # about 11 minutes on 2 CPU cores
    python bench/sfn_study.py --quick --work-dir W --out-dir OUT     # tiny model, a minute (a test runs it)

1. **Base.** The embedded default recipe as shipped (SARA, 800 steps) pretrains model A on the standard library's
   docstrings.
2. **Continue** A on a second corpus, the standard library's own source code (``data.source: stdlib_code``, read with
   A's tokenizer), from the same start (``model.init_from``: weights only, step 0) with: AdamW (one rate), GaLore
   (dominant), SARA (importance), and AdamW training only o_proj and its companions (``model.trainable:
   [sfn_oproj]``, SfN's Freeze). One seed each (the same seed: the same batches); learning rates of the 300-step
   quality study.
3. **Delta** between A and each continued model B: per block module type (q, k, v, o, gate, up, down) its share of
   the total squared change of the block matrices, sum ||w_B - w_A||^2 over the type / the sum over all seven (which
   removes the optimizers' different step sizes: lr for AdamW, lr x alpha inside a subspace for the low-rank ones),
   its relative change ||w_B - w_A|| / ||w_A||, and Sarle's bimodality coefficient of the element-wise relative
   change (``lowrank.module_delta``).
4. **Merge**: each block module type of the AdamW-continued model copied alone into A (``lowrank.module_surgery
   .merge_modules``), evaluated on the code validation split: which type carries the continuation's gain.
5. **Destruction** of A on its own validation split: each block module type zeroed and re-initialised from N(0,
   0.02^2) across every layer, each layer removed (``lowrank.module_surgery``): which types matter at this scale.

Every evaluation is the recipe's ``val/loss`` on 64 validation sequences
(``lowrank_recipes.recipes.validation_loss``). Runs are recipe processes (``recipes/pretrain.py``), two at a time with
one thread each; a finished run (its ``last.ckpt`` at the last step) is reused when the study runs again. Results:
``sfn.md``, ``sfn.json``, ``sfn_shares.png`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _sfn_report import render_markdown, write_plot

from lowrank.module_delta import by_module_type, module_deltas
from lowrank.module_surgery import destroy, merge_modules, remove_layers, select
from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.data.datamodule import PretrainDataModule
from lowrank_recipes.recipes.data.tokenizer import embedded_tokenizer_path
from lowrank_recipes.recipes.model import LlamaConfig
from lowrank_recipes.recipes.resume_config import config_changes, stored_config
from lowrank_recipes.recipes.validation_loss import ValidationBatches, validation_loss
from lowrank_recipes.recipes.weights import load_model_weights

from _common import TINY_RECIPE, pick_device, run_metadata

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "recipes" / "pretrain.py"
BLOCK_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> overrides of a continued run (lrs: the 300-step quality study's best for AdamW and GaLore)
CONTINUED: dict[str, tuple[str, ...]] = {
    "adamw": ("optimizer.name=adamw", "optimizer.lr=0.002"),
    "galore": ("optimizer.name=lowrank", "optimizer.lowrank.selector=dominant", "optimizer.lr=0.01"),
    "sara": ("optimizer.name=lowrank", "optimizer.lowrank.selector=importance", "optimizer.lr=0.01"),
    "adamw_oproj": ("optimizer.name=adamw", "optimizer.lr=0.002", "model.trainable=[sfn_oproj]"),
}
COMMON = (
    "trainer.checkpoint_every_n_steps=100000",
    "monitor.image_interval=null",
    "data.val_sequences=64",
)
QUICK = (
    *TINY_RECIPE,
    "model.vocab_size=384",
    "data.vocab_size=384",
    "model.num_layers=2",
    "data.max_documents=120",
    "trainer.val_every_n_steps=4",
)
STD = 0.02  # the recipe's init_std: what "re-initialise" draws from


def _done(out: Path, overrides: list[str]) -> bool:
    """Whether ``out`` holds this very run, finished: its last checkpoint's resolved config is the one these
    overrides resolve to (not only the same step: changed learning rates or a changed base retrain)."""
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        return False
    _, resolved = load_run_config("default", overrides)
    stored, step, _ = stored_config(last)
    changes, one_sided = config_changes(stored or {}, resolved)
    return stored is not None and step == resolved["trainer"]["max_steps"] and not changes and not one_sided


def _train(out: Path, overrides: list[str], steps: int, log: Path) -> float:
    """One recipe run in its own process (one thread); returns its seconds (0 when reused)."""
    overrides = [*overrides, f"trainer.max_steps={steps}", f"out_dir={out}"]
    if _done(out, overrides):
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(PRETRAIN), *overrides]
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"run {out.name} failed (exit {done.returncode}); its log: {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="runs and the tokenizer cache (reused)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--base-steps", type=int, default=800, help="steps of the base run (the recipe's default)")
    parser.add_argument("--steps", type=int, default=300, help="steps of every continued run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument(
        "--device", default="auto", help="where the evaluations run: auto, cpu, cuda (runs: the recipe's)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 + 8 steps (about a minute)")
    args = parser.parse_args()
    if args.quick:
        args.base_steps, args.steps = 8, 8
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [*COMMON, *(QUICK if args.quick else ()), f"data.cache_dir={work / 'cache'}"]
    started = time.perf_counter()

    # 1. the base run, and its tokenizer for the second corpus
    base_dir = work / "base"
    seconds = {"base": _train(base_dir, common, args.base_steps, work / "base.log")}
    base_run, _ = load_run_config("default", common)
    data = PretrainDataModule(base_run.data)
    data.prepare_data()
    tokenizer = embedded_tokenizer_path(data._embedded_documents(), base_run.data.vocab_size, base_run.data.cache_dir)
    base_ckpt = base_dir / "checkpoints" / "last.ckpt"

    # 2. the continued runs on the code corpus, from the same start
    code = [*common, "data.source=stdlib_code", f"data.tokenizer={tokenizer}", f"model.init_from={base_ckpt}"]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            name: pool.submit(_train, work / name, [*code, *extra], args.steps, work / f"{name}.log")
            for name, extra in CONTINUED.items()
        }
        seconds |= {name: future.result() for name, future in futures.items()}

    # evaluations: the base's own validation split and the code corpus's
    code_run, _ = load_run_config("default", code)
    base_val, code_val = ValidationBatches(base_run.data), ValidationBatches(code_run.data)
    model_config = base_run.model
    a = load_model_weights(base_ckpt).state
    models = {name: load_model_weights(work / name / "checkpoints" / "last.ckpt").state for name in CONTINUED}

    device = pick_device(args.device)

    def evaluate(state: dict[str, torch.Tensor], batches: ValidationBatches) -> float:
        return validation_loss(state, model_config, batches, device=device).loss

    losses = {"base": {"own": evaluate(a, base_val), "code": evaluate(a, code_val)}}
    losses |= {name: {"own": evaluate(s, base_val), "code": evaluate(s, code_val)} for name, s in models.items()}

    # 3. delta between A and each B, over the block matrices
    blocks = [n for n in a if any(f".{kind}." in n for kind in BLOCK_TYPES)]
    delta = {}
    for name, state in models.items():
        types = by_module_type(module_deltas(state, a, names=blocks))
        delta[name] = {
            kind: {"share": t.share, "relative_l2": t.relative_l2, "bimodality": t.bimodality}
            for kind, t in sorted(types.items(), key=lambda item: BLOCK_TYPES.index(item[0]))
        }

    # 4. merge: each block type of the AdamW-continued model alone into A, on the code split
    merged = {}
    for kind in BLOCK_TYPES:
        state, _ = merge_modules(a, models["adamw"], [rf"\.{kind}\."])
        merged[kind] = evaluate(state, code_val)

    # 5. destruction of A on its own split
    layers = model_config.num_layers
    destruction: dict[str, dict[str, float]] = {}
    for kind in BLOCK_TYPES:
        pattern = [rf"\.{kind}\."]
        zeroed, _ = destroy(a, pattern, "zero")
        reinit, _ = destroy(a, pattern, "reinit", seed=0, std=STD)
        destruction[kind] = {"zero": evaluate(zeroed, base_val), "reinit": evaluate(reinit, base_val)}
    removed = {}
    for layer in range(layers):
        state, count = remove_layers(a, [layer], layers)
        removed[layer] = validation_loss(state, _with_layers(model_config, count), base_val, device=device).loss
    assert select(list(a), [r"\.o_proj\."])  # the type names exist in this model

    result = {
        "meta": run_metadata(device, {k: str(v) for k, v in vars(args).items()}),
        "settings": {
            "base_steps": args.base_steps,
            "steps": args.steps,
            "continued": {name: list(extra) for name, extra in CONTINUED.items()},
            "common": common,
            "tokenizer": str(tokenizer),
            "validation_sequences": {
                name: sum(int(batch["input_ids"].shape[0]) for batch in batches.batches)
                for name, batches in (("own", base_val), ("code", code_val))
            },
        },
        "seconds": seconds,
        "total_seconds": time.perf_counter() - started,
        "losses": losses,
        "delta": delta,
        "merge": merged,
        "destruction": destruction,
        "removed_layers": {str(k): v for k, v in removed.items()},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sfn.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render_markdown(result)
    (args.out_dir / "sfn.md").write_text(text + "\n")
    write_plot(result, args.out_dir / "sfn_shares.png")
    print(text)


def _with_layers(config: LlamaConfig, count: int) -> LlamaConfig:
    return dataclasses.replace(config, num_layers=count)


if __name__ == "__main__":
    main()
