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
from lowrank.poet import apply_poet
from lowrank.structured import from_mapping
from lowrank.trainable import select_trainable, trainable_problems
from lowrank_recipes.recipes.checkpoints import LAST, checkpoint_problem, step_checkpoints
from lowrank_recipes.recipes.data.config import BUILTIN_SOURCES, EMBEDDED, DataConfig
from lowrank_recipes.recipes.data.file_check import FileReport, preflight
from lowrank_recipes.recipes.data.formats import file_kind, kinds_problem
from lowrank_recipes.recipes.delta_config import DeltaMonitorConfig
from lowrank_recipes.recipes.model import Llama, LlamaConfig

# The shipped configs: package data of lowrank_recipes.configs (the repository's configs/ in an editable install).
CONFIG_DIR = Path(str(files("lowrank_recipes.configs")))
PRECISIONS: tuple[str, ...] = ("32-true", "32", "bf16-mixed", "bf16-true")
# Lightning accelerators the recipe runs on; "gpu" is CUDA (or Apple's MPS), "auto" picks what the machine has.
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "gpu", "cuda", "mps")
# Per-layer updates step each weight inside backward: one device, a single-device strategy (callbacks/per_layer.py).
PER_LAYER_STRATEGIES: tuple[str, ...] = ("auto", "single_device")
# The smallest embedded BPE: 256 byte symbols, the end-of-document token and one merge (tokenizer.train_bpe).
MIN_EMBEDDED_VOCAB = 258
# How config values spell an OmegaConf interpolation that resolves.
INTERPOLATIONS = "a plain value, ${other.key} naming a key of the config, or ${oc.env:NAME} / ${oc.env:NAME,default}"
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
        accelerator: auto | cpu | gpu | cuda | mps; gpu/cuda/mps must be present on the machine ("auto" runs on the
            CPU when there is no GPU).
        strategy: auto | single_device | ddp | ddp_spawn | fsdp2 (Lightning's ModelParallelStrategy with
            ``fully_shard`` per decoder layer and on the root; needs optimizer.lowrank.side right or auto, fp32
            optimizer states and no per-layer updates).
        precision: 32-true | bf16-mixed (autocast, fp32 weights: the safe choice) | bf16-true (pure bf16 weights, as
            the reference runs).
        gradient_clip_val: global-norm clipping; None = off (reference: off below 7B, 1.0 at 7B). With
            ``optimizer.lowrank.projected_gradients`` the norm counts ||R|| <= ||G|| for the low-rank weights.
        val_every_n_steps: validation interval in optimizer steps.
        limit_val_batches: validation micro-batches per rank per validation (an integer >= 0; 0 turns validation
            off); None = the whole validation set.
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
            device with strategy auto or single_device, no accumulation: global_batch_size = micro_batch_size, no
            gradient_clip_val; subspaces then refresh inside backward on the same
            optimizer.refresh schedule, and the overlap monitor still logs them).
        per_layer_clip_norm: per-parameter gradient-norm clipping with per-layer updates (a number > 0); None = off.
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
        delta: per-module weight change against a reference (``DeltaMonitorConfig``; the ``ModuleDeltaMonitor``
            callback), off unless ``delta.every_n_steps`` is set.
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
    delta: DeltaMonitorConfig = dataclasses.field(default_factory=DeltaMonitorConfig)
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
    try:
        container = OmegaConf.to_container(loaded, resolve=True) if loaded is not None else None
    except OmegaConfBaseException as err:
        raise ConfigError(f"--config: {path}: {_resolution_problem(err)}") from None
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
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides {overrides}: {str(err).splitlines()[0]}") from None
    try:
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides: {_resolution_problem(err)}") from None


def _resolution_problem(err: OmegaConfBaseException) -> str:
    """An interpolation that does not resolve (``${oops}``, ``${env:X}``, an unset ``${oc.env:X}``) as ``key:
    problem; accepted: ...``."""
    key = getattr(err, "full_key", None) or "a value"
    cause = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    hint = " (OmegaConf spells it ${oc.env:NAME})" if "interpolation type env" in cause else ""
    return f"{key}: its interpolation does not resolve ({cause}){hint}; accepted: {INTERPOLATIONS}"


def load_run_config(config: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, dict[str, Any]]:
    """The validated run config and its resolved plain-dict form (what is printed and saved beside the logs)."""
    return run_config_from_mapping(_load_yaml(resolve_config_path(config)), overrides)


def run_config_from_mapping(
    mapping: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> tuple[RunConfig, dict[str, Any]]:
    """:func:`load_run_config` of a config already in memory (a checkpoint's resolved ``run_config``): the same
    overrides, defaults and checks."""
    data = _merge_overrides(dict(mapping), list(overrides))
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
    if run.data.tokenizer.startswith("~"):
        run.data.tokenizer = os.path.expanduser(run.data.tokenizer)
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
        problems.append(
            f"trainer.per_layer_updates: needs optimizer.name=lowrank; accepted with {run.optimizer.name}: false"
        )
    problems += projected_problems(run)
    if run.delta.every_n_steps is not None and run.optimizer.name == "poet":
        problems.append(
            "delta.every_n_steps: not supported with optimizer.name=poet (the weights are W = R W0 P, not parameters); "
            "accepted with poet: null; compare POET checkpoints with lowrank-diagnose delta, which reads them as their "
            "effective weights"
        )
    if t.strategy == "fsdp2":
        if run.optimizer.name == "poet":
            problems.append(
                "optimizer.name: poet is not supported with trainer.strategy=fsdp2 (a merge needs whole rows of W0, "
                "which FSDP2 shards); accepted with fsdp2: adamw | lowrank; accepted strategies with poet: auto, ddp"
            )
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
    if d.source in BUILTIN_SOURCES and (d.train_files or d.val_files):
        problems.append(
            f"data.train_files / data.val_files: set, but data.source is {d.source!r} (a corpus that ships with "
            "Python), which would ignore them; accepted: data.source=files (local JSONL/text) or data.source=c4 "
            "(local C4 shards), or drop the files"
        )
    clip = t.gradient_clip_val
    if clip is not None and not (is_number(clip) and clip >= 0):
        problems.append(f"trainer.gradient_clip_val: invalid value {clip!r}; accepted: a number >= 0, or null (off)")
    problems += _trainer_problems(run)
    out = Path(run.out_dir)
    if run.resume == "never" and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("*.ckpt")):
        problems.append(
            f"resume: never, but out_dir {run.out_dir!r} already holds checkpoints (a second history would start "
            "beside the first, and resume=auto would later pick the older run's last.ckpt); accepted: a new out_dir, "
            "remove that folder, or resume=auto"
        )
    problems += _output_problems(run.out_dir)
    problems += _tokenizer_problems(run)
    problems += _data_file_problems(run)
    if run.resume not in ("auto", "never"):  # a file, or a sharded (fsdp2) directory
        if not Path(run.resume).exists():
            problems.append(
                f"resume: checkpoint {run.resume!r} does not exist; accepted: auto | never | a checkpoint path"
            )
        elif (problem := checkpoint_problem(run.resume)) is not None:
            problems.append(
                f"resume: {run.resume!r} is not a usable checkpoint ({problem}); accepted: auto | never | a complete "
                "checkpoint file, or a sharded checkpoint directory (fsdp2)"
            )
    problems += run.optimizer.problems("optimizer") + run.monitor.problems("monitor") + run.delta.problems("delta")
    problems += trainable_problems(run.model.trainable) + _init_from_problems(run)
    if not problems:
        problems += _optimizer_problems(run)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


def _world_devices(trainer: TrainerConfig) -> int | None:
    """Devices per node as Lightning will count them (as ``trainer.world_devices`` does: "auto" is every GPU, or one
    CPU process); None when ``trainer.devices`` is invalid."""
    if trainer.devices == "auto":
        return max(1, torch.cuda.device_count()) if trainer.accelerator in ("auto", "gpu", "cuda") else 1
    return trainer.devices if isinstance(trainer.devices, int) and trainer.devices >= 1 else None


def _accelerator_problem(name: str) -> str | None:
    """An unknown accelerator, or one this machine does not have (``auto`` always runs: on the CPU without a GPU)."""
    if name not in ACCELERATORS:
        return f"trainer.accelerator: invalid value {name!r}; accepted: {' | '.join(ACCELERATORS)}"
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    present = {"auto": True, "cpu": True, "gpu": cuda or mps, "cuda": cuda, "mps": mps}
    if present[name]:
        return None
    device = "Apple MPS device" if name == "mps" else "GPU (torch.cuda.is_available() is False)"
    here = " | ".join(a for a in ACCELERATORS if present[a])
    return f"trainer.accelerator: {name!r}, but this machine has no {device}; accepted on this machine: {here}"


def _trainer_problems(run: RunConfig) -> list[str]:
    """The accelerator, the validation limit, and what per-layer updates cannot honour (the conditions
    ``callbacks/per_layer.py`` refuses once the Trainer runs: accumulation, global clipping, more than one device)."""
    t, d = run.trainer, run.data
    problems = []
    if (problem := _accelerator_problem(t.accelerator)) is not None:
        problems.append(problem)
    if t.limit_val_batches is not None and t.limit_val_batches < 0:
        problems.append(
            f"trainer.limit_val_batches: invalid value {t.limit_val_batches!r}; accepted: an integer >= 0 (0: no "
            "validation), or null (the whole validation set)"
        )
    norm = t.per_layer_clip_norm
    if norm is not None and not (is_number(norm) and norm > 0):
        problems.append(f"trainer.per_layer_clip_norm: invalid value {norm!r}; accepted: a number > 0, or null (off)")
    if not t.per_layer_updates:
        return problems
    devices = _world_devices(t)
    per_step = None if devices is None else d.micro_batch_size * devices * t.num_nodes
    if per_step is not None and t.global_batch_size > per_step:
        problems.append(
            f"trainer.global_batch_size: {t.global_batch_size} accumulates gradients over "
            f"{t.global_batch_size // per_step} micro-batches of data.micro_batch_size x devices x num_nodes = "
            f"{per_step}, but trainer.per_layer_updates steps each weight in every backward; accepted with per-layer "
            f"updates: trainer.global_batch_size={per_step} (a larger data.micro_batch_size for a larger batch)"
        )
    clip = t.gradient_clip_val
    if clip and is_number(clip):
        problems.append(
            f"trainer.gradient_clip_val: {clip} clips the norm over all gradients at once, but "
            "trainer.per_layer_updates steps each weight as soon as its gradient exists; accepted with per-layer "
            "updates: null or 0 (trainer.per_layer_clip_norm clips each parameter on its own)"
        )
    several = devices is not None and devices * t.num_nodes > 1
    if t.strategy != "fsdp2" and (t.strategy not in PER_LAYER_STRATEGIES or several):
        problems.append(
            f"trainer.per_layer_updates: runs on one device with a single-device strategy (DDP would reduce the "
            f"gradients after the weights were stepped), got strategy={t.strategy}, devices={t.devices}, "
            f"num_nodes={t.num_nodes}; accepted with per-layer updates: trainer.strategy="
            f"{' | '.join(PER_LAYER_STRATEGIES)}, trainer.devices=1, trainer.num_nodes=1"
        )
    return problems


def _output_problems(out_dir: str) -> list[str]:
    """``out_dir`` and its ``checkpoints/`` can be created and written: no parent is a file or a dangling link, and
    the nearest existing folder is writable (``os.access``; root writes anywhere but on a read-only file system)."""
    if not out_dir.strip():
        return ["out_dir: empty (it would write into the current folder); accepted: a directory path"]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        return [f"out_dir: {out_dir!r} exists and is a file; accepted: a directory path (new or existing)"]
    checkpoints = out / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        return [
            f"out_dir: {checkpoints} exists and is a file, where the checkpoints folder goes; accepted: another "
            "out_dir, or move that file away"
        ]
    for folder in (checkpoints, out, *out.parents):
        if folder.is_symlink() and not folder.exists():
            return [f"out_dir: {out_dir!r} cannot be created: {folder} is a dangling link; accepted: a directory path"]
        if not folder.exists():
            continue
        if not folder.is_dir():
            return [
                f"out_dir: {out_dir!r} cannot be created: {folder} is a file; accepted: a directory path whose "
                "parents are directories"
            ]
        if not os.access(folder, os.W_OK | os.X_OK):
            what = "cannot be created in" if folder not in (out, checkpoints) else "is not writable:"
            return [
                f"out_dir: {out_dir!r} {what} {folder} (read-only for this user or file system; the run writes "
                "config.yaml, logs and checkpoints there); accepted: a directory path this user can write to"
            ]
        if folder != checkpoints:
            return []
        # checkpoints/ exists and is writable: out_dir itself (config.yaml, logs) is checked next
    return []


def _looks_like_path(value: str) -> bool:
    """A tokenizer value meant as a local path: absolute or relative (``/``, ``.``, ``~``), a ``.json`` name, more
    than one ``/``, or ``folder/name`` under an existing local folder. A Hub name is ``name`` or ``namespace/name``."""
    return (
        value.startswith((".", "~", "/", os.sep))
        or value.endswith(".json")
        or value.count("/") > 1
        or (os.sep != "/" and os.sep in value)
        or ("/" in value and Path(value.split("/")[0]).is_dir())
    )


def _tokenizer_problems(run: RunConfig) -> list[str]:
    """The tokenizer exists and the model's vocabulary holds every token id it produces: the embedded BPE's ids run
    up to ``data.vocab_size - 1``; a local ``tokenizer.json`` is read (its base vocabulary and end-of-document id). A
    Hub name is not looked up (no network here)."""
    d, m = run.data, run.model
    if d.tokenizer == EMBEDDED:
        if d.vocab_size < MIN_EMBEDDED_VOCAB:
            return [
                f"data.vocab_size: invalid value {d.vocab_size}; accepted with data.tokenizer=embedded: an integer >= "
                f"{MIN_EMBEDDED_VOCAB} (256 byte symbols, the end-of-document token and one merge)"
            ]
        if d.vocab_size > m.vocab_size:
            return [
                f"data.vocab_size: {d.vocab_size} exceeds model.vocab_size = {m.vocab_size} (the embedded BPE's token "
                "ids run up to data.vocab_size - 1, and the model's embedding has model.vocab_size rows); accepted: "
                f"data.vocab_size <= {m.vocab_size}, or model.vocab_size >= {d.vocab_size} (equal is usual)"
            ]
        return []
    path = Path(d.tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        if not _looks_like_path(d.tokenizer) and not path.is_dir():
            return []  # a Hub name such as t5-base
        return [
            f"data.tokenizer: {d.tokenizer!r} looks like a path and "
            + ("holds no tokenizer.json" if path.is_dir() else "does not exist")
            + "; accepted: embedded, an existing tokenizer.json (or a folder holding one), or a Hub name such as "
            "t5-base"
        ]
    from lowrank_recipes.recipes.data.tokenizer import load_tokenizer  # tokenizers only: no training library

    try:
        tokenizer = load_tokenizer(str(file), eos_token=d.eos_token)
    except ValueError as err:  # no end-of-document token
        return [f"data.eos_token: {err}"]
    except Exception as err:  # not a tokenizers file
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return [f"data.tokenizer: {file} is not a tokenizers tokenizer.json ({cause}); accepted: a tokenizer.json file"]
    needed = max(tokenizer.tokenizer.get_vocab_size(with_added_tokens=False), tokenizer.eos_id + 1)
    if m.vocab_size < needed:
        return [
            f"model.vocab_size: {m.vocab_size} is smaller than the token ids of data.tokenizer {str(file)!r} (0 .. "
            f"{needed - 1}); accepted: an integer >= {needed}"
        ]
    return []


def _data_file_problems(run: RunConfig) -> list[str]:
    """Local data files: present, files (not folders) of one supported kind, readable in their first records
    (:func:`file_check.preflight`), holding a document, and (when read whole) roughly long enough."""
    d = run.data
    problems = []
    for key in ("train_files", "val_files"):
        missing = [f for f in getattr(d, key) or [] if not Path(f).exists()]
        if missing:
            problems.append(f"data.{key}: missing file(s) {missing}")
        folders = [f for f in getattr(d, key) or [] if Path(f).is_dir()]
        if folders:
            problems.append(
                f"data.{key}: {folders} are folders; accepted: a list of files (data.{key}=[dir/a.jsonl,dir/b.jsonl])"
            )
    if d.source in BUILTIN_SOURCES:
        return problems  # the files are refused as ignored (validate_run); their content does not matter
    kinds = {key: kinds_problem(getattr(d, key) or []) for key in ("train_files", "val_files")}
    problems += [f"data.{key}: {problem}" for key, problem in kinds.items() if problem is not None]
    mixed = kinds_problem([f for key in ("train_files", "val_files") for f in getattr(d, key) or []])
    if mixed is not None and not any(kinds.values()):  # each key reads alone; together they mix JSON lines and text
        problems.append(f"data.train_files / data.val_files: {mixed}")
    for key in ("train_files", "val_files"):
        named = getattr(d, key) or []
        reports = [preflight(f) for f in named if Path(f).is_file() and file_kind(f) is not None]
        problems += [f"data.{key}: {r.path}, {r.problem}" for r in reports if r.problem is not None]
        empty = [r.path for r in reports if r.problem is None and not r.documents]
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
        elif named and len(reports) == len(named) and all(r.problem is None for r in reports):
            problems += _length_problems(run, key, reports)
    return problems


def _length_problems(run: RunConfig, key: str, reports: list[FileReport]) -> list[str]:
    """A rough length check of files read whole: tokens are taken as at most the text's UTF-8 bytes plus one
    end-of-document token per document (byte-level tokenizers never exceed it); files read in part are long enough."""
    d, t = run.data, run.trainer
    if not all(r.complete for r in reports):
        return []
    files = [r.path for r in reports]
    tokens = sum(r.text_bytes + r.documents for r in reports)
    documents = sum(r.documents for r in reports)
    if key == "val_files":
        need = d.seq_len + 1
        what = ("one validation sequence, data.seq_len + 1", "no val/loss would be logged")
    elif d.source == "files":
        if not d.val_files and documents < d.holdout_every:
            return [
                f"data.train_files: {files} hold {documents} document(s), fewer than data.holdout_every = "
                f"{d.holdout_every}, so none is held out for validation; fix: data.val_files, a smaller "
                "data.holdout_every, or more documents"
            ]
        need = t.global_batch_size * (d.seq_len + 1)
        what = ("one optimizer step, trainer.global_batch_size x (data.seq_len + 1)", "the run could not take a step")
    else:
        return []  # the c4 stream starts another pass over short files: any document is enough
    if tokens >= need:
        return []
    smaller = "data.seq_len or trainer.global_batch_size" if key == "train_files" else "data.seq_len"
    return [
        f"data.{key}: {files} hold at most about {tokens} tokens (a rough check of the files read whole: their "
        f"text's UTF-8 bytes plus one end-of-document token per document), fewer than {what[0]} = {need}: {what[1]}; "
        f"fix: more text, or a smaller {smaller}"
    ]


def _optimizer_problems(run: RunConfig) -> list[str]:
    """Builds the optimizer over the model on the meta device (no memory): catches ranks, target and trainable
    patterns."""
    with torch.device("meta"):
        model = Llama(run.model)
    try:
        if run.optimizer.name == "poet":
            apply_poet(model, run.optimizer.poet, run.optimizer.lowrank.targets, 0)
        select_trainable(model, run.model.trainable)
        build_optimizer(model, run.optimizer)
    except ValueError as err:
        return [str(err)]
    return []


def _will_resume(run: RunConfig) -> bool:
    """Whether this start continues a checkpoint (as ``recipes.trainer.resume_path`` decides, without checking it)."""
    if run.resume in ("never", "auto"):
        folder = Path(run.out_dir) / "checkpoints"
        return run.resume == "auto" and (os.path.lexists(folder / LAST) or bool(step_checkpoints(folder)))
    return True


def _init_from_problems(run: RunConfig) -> list[str]:
    """``model.init_from``: the weights exist, load (mapped, not read, for a checkpoint file) and fit the model's
    shape; POET then starts from them as W0 (``optimizer.poet.init: normal``). Not read when the run resumes (its
    checkpoint's weights are restored)."""
    path = run.model.init_from
    if path is None or _will_resume(run):
        return []
    from lowrank_recipes.recipes.weights import ACCEPTED, WeightsError, initial_weights  # only with init_from

    key = "model.init_from"
    if not Path(path).exists():
        return [f"{key}: {path!r} does not exist; accepted: {ACCEPTED}, or null (random initialisation)"]
    problems = []
    if run.optimizer.name == "poet" and run.optimizer.poet.init != "normal":
        problems.append(
            f"{key}: with optimizer.name=poet the loaded weights become W0 only with optimizer.poet.init=normal "
            f"(now {run.optimizer.poet.init!r}, which draws a new W0); accepted with init_from: normal"
        )
    try:
        initial_weights(path, run.model, key)
    except (WeightsError, OSError, RuntimeError) as err:
        problems.append(str(err))
    return problems


def projected_problems(run: RunConfig) -> list[str]:
    """What ``optimizer.lowrank.projected_gradients: true`` cannot run with (the full gradient needed every step, or
    sharded weights); empty when it is off."""
    if not run.optimizer.lowrank.projected_gradients:
        return []
    key, problems = "optimizer.lowrank.projected_gradients", []
    if run.optimizer.name != "lowrank":
        problems.append(f"{key}: needs optimizer.name=lowrank; accepted with {run.optimizer.name}: false")
    if run.trainer.per_layer_updates:
        problems.append(
            f"{key}: not supported with trainer.per_layer_updates (per-layer updates step from the full gradient "
            "inside backward); accepted with per-layer updates: false"
        )
    if run.optimizer.lowrank.fira:
        problems.append(
            f"{key}: not supported with optimizer.lowrank.fira (Fira's residual needs the full gradient at every "
            "step); accepted with fira: false"
        )
    return problems
