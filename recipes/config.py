"""The run configuration: one dataclass per YAML section, every default documented, and the loader.

A config file (``configs/*.yaml``) maps one-to-one onto :class:`RunConfig`. ``load_run_config`` resolves
``--config`` (a path, or a bare name with or without ``.yaml`` under configs/), applies ``key=value`` overrides
(OmegaConf dotlist), builds the dataclasses and validates everything, raising :class:`ConfigError` (one paragraph,
the offending key and the accepted values) before any training work or output starts.
"""

from __future__ import annotations

import dataclasses
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lowrank.checks import is_number
from lowrank.config import OptimizerConfig
from lowrank.factory import build_optimizer
from lowrank.overlap import OverlapMonitorOptions
from lowrank.structured import from_mapping
from lowrank_recipes.recipes.data.config import DataConfig
from lowrank_recipes.recipes.data.file_check import has_document
from lowrank_recipes.recipes.model import Llama, LlamaConfig

# The shipped configs: package data of lowrank_recipes.configs (the repository's configs/ in an editable install).
CONFIG_DIR = Path(str(files("lowrank_recipes.configs")))
PRECISIONS: tuple[str, ...] = ("32-true", "32", "bf16-mixed", "bf16-true")
# FSDP1 ("fsdp") hands the optimizer flattened 1-D views and DeepSpeed flattens parameters: no 2-D gradient to
# project. Both are refused with an explanation.
# "fsdp2" is Lightning's ModelParallelStrategy (data parallel only) with ``fully_shard`` on each decoder layer and
# the root (``LlamaPretrainModule.configure_model``): row-sharded DTensor weights, projected on the right.
STRATEGIES: tuple[str, ...] = ("auto", "single_device", "ddp", "ddp_spawn", "fsdp2")
# "sharded": one file per rank in a ``step=N.ckpt/`` directory (torch.distributed.checkpoint), fsdp2 only; "full": one
# ``torch.load``-able file, gathered on rank 0 (the only format of the other strategies); "auto": sharded under fsdp2,
# full otherwise (resolved to one of the two by ``load_run_config``).
CHECKPOINT_FORMATS: tuple[str, ...] = ("auto", "sharded", "full")
REFUSED_STRATEGIES: dict[str, str] = {
    "fsdp": "Lightning's FSDP1 strategy hands the optimizer flattened 1-D views of the weights, so there is no 2-D "
    "gradient to project",
    "deepspeed": "DeepSpeed flattens parameters, so there is no 2-D gradient to project",
}


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one paragraph without a traceback."""


@dataclasses.dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up to ``optimizer.lr``, then cosine decay to ``min_lr_ratio * lr``.

    Attributes:
        warmup_fraction: warm-up length as a fraction of ``trainer.max_steps`` (reference: 10%).
        min_lr_ratio: floor of the cosine as a fraction of the peak (reference: 0.1).
    """

    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1


@dataclasses.dataclass
class TrainerConfig:
    """What Lightning's Trainer gets.

    Attributes:
        max_steps: optimizer steps of the run (the run length; epochs are unbounded).
        global_batch_size: sequences per optimizer step over all ranks (reference: 512); gradient accumulation is
            global_batch_size / (data.micro_batch_size * devices * num_nodes), which must be a whole number.
        devices: devices per node (an int, or "auto").
        num_nodes: nodes.
        accelerator: "auto", "cpu", "gpu", ...
        strategy: auto | single_device | ddp | ddp_spawn | fsdp2 (Lightning's ModelParallelStrategy with
            ``fully_shard`` per decoder layer and on the root; needs optimizer.lowrank.side right or auto, fp32
            optimizer states and no per-layer updates).
        precision: 32-true | bf16-mixed (autocast, fp32 weights: the safe choice) | bf16-true (pure bf16 weights, as
            the reference runs).
        gradient_clip_val: global-norm clipping; None = off (reference: off below 7B, 1.0 at 7B).
        val_every_n_steps: validation interval in optimizer steps.
        limit_val_batches: validation micro-batches per rank per validation; None = the whole validation set.
        log_every_n_steps: logging interval in optimizer steps.
        checkpoint_every_n_steps: periodic checkpoint interval in optimizer steps (``last.ckpt`` is kept too).
        checkpoint_format: auto | sharded | full. ``sharded`` (fsdp2 only): every rank writes its shards into a
            checkpoint directory (``torch.distributed.checkpoint``), no gather; resumable on the same number of ranks.
            ``full``: one file gathered on rank 0 that loads with ``torch.load(weights_only=True)`` and is not tied
            to the rank count or the strategy (FSDP2 ranks resume it on FSDP2 ranks or in one process); the gather
            costs rank 0 the CPU memory of the whole model and optimizer state. ``auto``: sharded under fsdp2, full
            otherwise (the other strategies only write full files, so ``sharded`` is refused there). The resolved
            config holds the concrete format.
        per_layer_updates: step each weight inside backward and free its gradient at once (lowrank optimizer, one
            device, no accumulation, no gradient_clip_val; subspaces then refresh inside backward on the same
            optimizer.refresh schedule, and the overlap monitor still logs them).
        per_layer_clip_norm: per-parameter gradient-norm clipping with per-layer updates; None = off.
    """

    max_steps: int = 800
    global_batch_size: int = 16
    devices: int | str = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float | None = None
    val_every_n_steps: int = 100
    limit_val_batches: int | None = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 200
    checkpoint_format: str = "auto"
    per_layer_updates: bool = False
    per_layer_clip_norm: float | None = None


@dataclasses.dataclass
class RunConfig:
    """A whole run.

    Attributes:
        model: the LLaMA's shape (``lowrank_recipes.recipes.model.LlamaConfig``).
        data: data source, tokenizer, sequence length, micro-batch (``lowrank_recipes.recipes.data.DataConfig``).
        optimizer: ``adamw`` or ``lowrank`` and their settings (``lowrank.OptimizerConfig``), the subspace refresh
            schedule included (``optimizer.refresh``, ``lowrank.RefreshSchedule``).
        schedule: learning-rate schedule.
        monitor: subspace-overlap monitoring of a low-rank run (``lowrank.overlap.OverlapMonitorOptions``; the
            ``SubspaceOverlapMonitor`` callback).
        trainer: Lightning Trainer settings.
        out_dir: where TensorBoard logs, checkpoints and the resolved config go.
        seed: seeds model init and, unless ``data.seed`` / ``optimizer.lowrank.seed`` are set, the data order and
            the subspace draws.
        resume: "auto" (``out_dir/checkpoints/last.ckpt`` if it exists and passes a cheap check, else the newest
            step checkpoint that does), "never", or a checkpoint path.
    """

    # The former ``subspace`` section: its schedule keys joined optimizer.refresh, its monitor keys the monitor section.
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        **{
            f"subspace.{k}": f"optimizer.refresh.{k}"
            for k in ("stagger", "switch_at", "switch_to", "split_across_ranks")
        },
        **{
            f"subspace.{k}": f"monitor.{k}"
            for k in ("per_layer", "image_interval", "frozen_threshold", "frozen_patience")
        },
    }

    model: LlamaConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    monitor: OverlapMonitorOptions = dataclasses.field(default_factory=OverlapMonitorOptions)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    out_dir: str = "runs/default"
    seed: int = 0
    resume: str = "auto"


def available_configs() -> list[str]:
    """Bare names of the configs shipped under configs/."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path from ``--config``: an existing path, or a bare name (``.yaml`` optional) under configs/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    candidate = CONFIG_DIR / f"{stem}.yaml"
    if path.parent == Path(".") and candidate.is_file():
        return candidate
    raise ConfigError(
        f"--config: no config {name_or_path!r} (neither a file nor a name under {CONFIG_DIR}); "
        f"available: {', '.join(available_configs())}"
    )


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, Exception) as err:  # yaml.YAMLError and friends
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--config: {path} is not valid YAML ({first})") from None
    container = OmegaConf.to_container(loaded, resolve=True) if loaded is not None else None
    if not isinstance(container, dict):
        raise ConfigError(
            f"--config: {path} must hold a mapping of sections (model, data, ...), got {type(container).__name__}"
        )
    return container


def _merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (for example trainer.max_steps=100)")
    try:
        merged = OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides {overrides}: {str(err).splitlines()[0]}") from None


def load_run_config(config: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, dict[str, Any]]:
    """The validated run config and its resolved plain-dict form (what is printed and saved beside the logs)."""
    data = _merge_overrides(_load_yaml(resolve_config_path(config)), list(overrides))
    try:
        run = from_mapping(RunConfig, data, "")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # `seed` is the one knob that varies a run: the data order and the subspace draws follow it unless set
    if run.optimizer.lowrank.seed is None:
        run.optimizer.lowrank.seed = run.seed
    if run.data.seed is None:
        run.data.seed = run.seed
    _expand_user_paths(run)
    # the horizon of a selector switch: the run's length unless set (explicit in the resolved config)
    if isinstance(run.trainer.max_steps, int) and run.trainer.max_steps >= 1:
        run.optimizer.refresh = run.optimizer.refresh.with_max_steps(run.trainer.max_steps)
    validate_run(run)
    if run.trainer.strategy == "fsdp2":
        run.optimizer.lowrank.side = "right"  # what auto means for DTensors; explicit in the resolved config
    if run.trainer.checkpoint_format == "auto":
        run.trainer.checkpoint_format = "sharded" if run.trainer.strategy == "fsdp2" else "full"
    return run, _plain(dataclasses.asdict(run))


def _expand_user_paths(run: RunConfig) -> None:
    """``~`` in paths means the home folder, as in a shell (``out_dir=~/x`` would otherwise write into ``./~/x``)."""
    run.out_dir = os.path.expanduser(run.out_dir)
    if run.resume not in ("auto", "never"):
        run.resume = os.path.expanduser(run.resume)
    for key in ("train_files", "val_files"):
        files = getattr(run.data, key)
        if files:
            setattr(run.data, key, [os.path.expanduser(f) for f in files])


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: the resolved config is written as YAML."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def validate_run(run: RunConfig) -> None:
    """Cross-section checks, every problem collected into one ConfigError."""
    t, d = run.trainer, run.data
    problems = []
    if d.seq_len > run.model.max_seq_len:
        problems.append(
            f"data.seq_len: {d.seq_len} exceeds model.max_seq_len = {run.model.max_seq_len}; accepted: 1 .. "
            f"{run.model.max_seq_len}"
        )
    if (
        t.strategy in REFUSED_STRATEGIES
        or t.strategy.startswith("deepspeed")
        or (t.strategy.startswith("fsdp") and t.strategy not in STRATEGIES)
    ):
        why = REFUSED_STRATEGIES.get(
            t.strategy, REFUSED_STRATEGIES["deepspeed" if "deepspeed" in t.strategy else "fsdp"]
        )
        problems.append(
            f"trainer.strategy: {t.strategy!r} is not supported: {why}; accepted: {' | '.join(STRATEGIES)} "
            "(ddp for several devices)"
        )
    elif t.strategy not in STRATEGIES:
        problems.append(f"trainer.strategy: invalid value {t.strategy!r}; accepted: {' | '.join(STRATEGIES)}")
    if t.checkpoint_format not in CHECKPOINT_FORMATS:
        problems.append(
            f"trainer.checkpoint_format: invalid value {t.checkpoint_format!r}; "
            f"accepted: {' | '.join(CHECKPOINT_FORMATS)}"
        )
    elif t.checkpoint_format == "sharded" and t.strategy != "fsdp2":
        problems.append(
            f"trainer.checkpoint_format: 'sharded' needs trainer.strategy=fsdp2 (strategy {t.strategy!r} "
            "writes single-file checkpoints only); accepted with it: auto | full"
        )
    if t.precision not in PRECISIONS:
        problems.append(f"trainer.precision: invalid value {t.precision!r}; accepted: {' | '.join(PRECISIONS)}")
    for key in (
        "max_steps",
        "global_batch_size",
        "num_nodes",
        "val_every_n_steps",
        "log_every_n_steps",
        "checkpoint_every_n_steps",
    ):
        if getattr(t, key) < 1:
            problems.append(f"trainer.{key}: invalid value {getattr(t, key)!r}; accepted: an integer >= 1")
    if isinstance(t.devices, str) and t.devices != "auto" or isinstance(t.devices, int) and t.devices < 1:
        problems.append(f"trainer.devices: invalid value {t.devices!r}; accepted: an integer >= 1 or auto")
    elif isinstance(t.devices, int) and t.global_batch_size % (d.micro_batch_size * t.devices * t.num_nodes):
        problems.append(
            f"trainer.global_batch_size: {t.global_batch_size} is not a multiple of data.micro_batch_size x devices x "
            f"num_nodes = {d.micro_batch_size * t.devices * t.num_nodes}; accepted: multiples of it"
        )
    split = run.optimizer.refresh.split_across_ranks
    if t.per_layer_updates and split:
        problems.append(
            "optimizer.refresh.split_across_ranks: not supported with trainer.per_layer_updates (the bases refresh "
            "inside backward, one parameter at a time); accepted with per-layer updates: false"
        )
    if t.per_layer_updates and run.optimizer.name != "lowrank":
        problems.append("trainer.per_layer_updates: needs optimizer.name=lowrank; accepted with adamw: false")
    if t.strategy == "fsdp2":
        if t.per_layer_updates:
            problems.append(
                "trainer.per_layer_updates: not supported with trainer.strategy=fsdp2 (FSDP2 reduce-scatters "
                "the gradients after backward); accepted with fsdp2: false"
            )
        if split:
            problems.append(
                "optimizer.refresh.split_across_ranks: not supported with trainer.strategy=fsdp2 (every rank "
                "computes the bases from the gathered gradient); accepted with fsdp2: false"
            )
        if run.optimizer.lowrank.side == "left":
            problems.append(
                "optimizer.lowrank.side: 'left' is not supported with trainer.strategy=fsdp2 (row-sharded "
                "weights project locally on the right); accepted with fsdp2: right | auto"
            )
    for key in ("warmup_fraction", "min_lr_ratio"):
        if not 0 <= getattr(run.schedule, key) <= 1:
            problems.append(
                f"schedule.{key}: invalid value {getattr(run.schedule, key)!r}; accepted: a number in [0, 1]"
            )
    if d.source == "embedded" and (d.train_files or d.val_files):
        problems.append(
            "data.train_files / data.val_files: set, but data.source is 'embedded' (the corpus that ships with "
            "Python), which would ignore them; accepted: data.source=files (local JSONL/text) or data.source=c4 "
            "(local C4 shards), or drop the files"
        )
    clip = t.gradient_clip_val
    if clip is not None and not (is_number(clip) and clip >= 0):
        problems.append(f"trainer.gradient_clip_val: invalid value {clip!r}; accepted: a number >= 0, or null (off)")
    out = Path(run.out_dir)
    if run.resume == "never" and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("*.ckpt")):
        problems.append(
            f"resume: never, but out_dir {run.out_dir!r} already holds checkpoints (a second history would start "
            "beside the first, and resume=auto would later pick the older run's last.ckpt); accepted: a new out_dir, "
            "remove that folder, or resume=auto"
        )
    if not run.out_dir.strip():
        problems.append("out_dir: empty (it would write into the current folder); accepted: a directory path")
    elif out.exists() and not out.is_dir():
        problems.append(f"out_dir: {run.out_dir!r} exists and is a file; accepted: a directory path (new or existing)")
    for key in ("train_files", "val_files"):
        missing = [f for f in getattr(d, key) or [] if not Path(f).exists()]
        if missing:
            problems.append(f"data.{key}: missing file(s) {missing}")
        empty = [f for f in getattr(d, key) or [] if Path(f).is_file() and not has_document(f)]
        if empty:
            why = "no val/loss would be logged" if key == "val_files" else "nothing to train on"
            problems.append(
                f"data.{key}: file(s) {empty} hold no document (empty, or no record with a non-empty "
                f"'text'): {why}; accepted: files with at least one document"
                + (
                    ", or no data.val_files (source 'files' then holds out every data.holdout_every-th document)"
                    if key == "val_files" and d.source == "files"
                    else ""
                )
            )
    if run.resume not in ("auto", "never") and not Path(run.resume).exists():  # a file, or a sharded (fsdp2) directory
        problems.append(f"resume: checkpoint {run.resume!r} does not exist; accepted: auto | never | a checkpoint path")
    problems += run.optimizer.problems("optimizer") + run.monitor.problems("monitor")
    if not problems:
        problems += _optimizer_problems(run)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


def _optimizer_problems(run: RunConfig) -> list[str]:
    """Builds the optimizer over the model on the meta device (no memory): catches ranks and target patterns."""
    with torch.device("meta"):
        model = Llama(run.model)
    try:
        build_optimizer(model, run.optimizer)
    except ValueError as err:
        return [str(err)]
    return []
