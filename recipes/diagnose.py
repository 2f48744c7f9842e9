"""Offline diagnostics of trained LLaMA weights: the "stethoscopes" of arXiv 2505.20993 (SfN).

    lowrank-diagnose evaluate WEIGHTS [--config NAME_OR_YAML] [--tokenizer PATH] [--limit-batches N] [key=value ...]
    lowrank-diagnose delta A B [--out DIR] [--threshold T] [--bins N]
    lowrank-diagnose merge A B --modules PATTERN [PATTERN ...] [--layers START-END] --out FILE [--evaluate]
    lowrank-diagnose destroy CKPT --how zero|reinit --modules PATTERN ... [--layers START-END] --out FILE [--evaluate]
    lowrank-diagnose destroy CKPT --how remove --layers START-END --out FILE [--evaluate]
    lowrank-diagnose destroy-table CKPT [--how zero|reinit] [--layers START-END]

(also ``python -m lowrank_recipes.recipes.diagnose``). WEIGHTS, A, B and CKPT are anything
:func:`lowrank_recipes.recipes.weights.load_model_weights` reads: a recipe checkpoint (file or fsdp2 directory; POET
runs as their effective weights R W0 P), a file this tool wrote, or Hugging Face LLaMA safetensors.

* ``evaluate``: the recipe's val/loss and val/ppl of the weights (:mod:`lowrank_recipes.recipes.validation_loss`) on
  the validation data of the checkpoint's run config, or of ``--config`` (needed, with ``--tokenizer``, for weights
  that hold no data section: Hugging Face weights); ``key=value`` overrides change that config (``data.*``,
  ``trainer.precision``, ``trainer.limit_val_batches``; ``model.*`` of ``--config``). The config is read and
  validated by :func:`lowrank_recipes.recipes.config.load_run_config`, the recipe's own loader.
* ``delta``: per layer and module type ||W_B - W_A|| and the relative change, per module type the share of the total
  squared change and Sarle's bimodality coefficient of the element-wise relative change
  (:mod:`lowrank_recipes.recipes.delta_report`): a table, and with ``--out`` delta.md, delta.json and delta.png.
* ``merge``: A with the modules matching the patterns (regular expressions over parameter names, within the
  ``--layers`` range, inclusive) copied from B, written with ``save_model_weights``. A and B must have one
  architecture: the same tensor names and shapes, and the same num_heads, max_seq_len, rms_norm_eps and rope_theta.
* ``destroy``: the matched modules zeroed or re-drawn from N(0, std^2) (seeded per name), or whole layers removed
  (the written run config's ``model.num_layers`` follows).
* ``destroy-table``: destroys each module type in turn (across ``--layers``) and tabulates the validation loss.

With ``--evaluate``, ``merge`` reports the loss of A, of the merged model and of B, ``destroy`` before and after;
every model is evaluated in memory before the output is written. Every misuse (a pattern that matches nothing, a
layer range outside the model, A and B of different architectures, an output that exists without ``--overwrite``,
weights that cannot be evaluated) is reported in one paragraph on stderr with exit status 2, naming the one argument
at fault, before anything is written: outputs are written last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowrank.checks import first_problems
from lowrank.module_surgery import (
    architecture_problems,
    destroy_names,
    merge_modules,
    names_by_module_type,
    remove_layers,
    select,
)
from lowrank_recipes.recipes.model import LlamaConfig
from lowrank_recipes.recipes.weights import (
    ModelWeights,
    WeightsError,
    check_compatible,
    load_model_weights,
    save_model_weights,
)

if TYPE_CHECKING:
    from lowrank_recipes.recipes.config import RunConfig
    from lowrank_recipes.recipes.validation_loss import Evaluation

# A config override: config.py's rule (``_merge_overrides``: an '=' after a non-empty key, ``seed=1`` as well as
# ``data.seq_len=64``); an item starting with '-' is an option, which argparse (as in the recipe's own CLI) never hands
# over as an override. A ``--modules`` pattern therefore cannot contain '='.
_OVERRIDE = re.compile(r"^[^=-][^=]*=")
# LlamaConfig fields that two models with the same tensor shapes can still differ in (merge refuses such A and B).
ARCHITECTURE_FIELDS: tuple[str, ...] = ("num_heads", "max_seq_len", "rms_norm_eps", "rope_theta")
_LAYERS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class UsageError(Exception):
    """A misuse of the command line: reported on stderr with exit status 2, nothing written."""


# -------------------------------------------------------------------------------------------------------- arguments
def parse_layers(text: str | None) -> range | None:
    """``--layers START-END`` (both inclusive) or ``--layers N`` -> range(START, END + 1); None stays None."""
    if text is None:
        return None
    found = _LAYERS.match(text)
    if not found:
        raise UsageError(f"--layers: invalid value {text!r}; accepted: START-END (inclusive, e.g. 0-3) or one index N")
    start = int(found.group(1))
    end = int(found.group(2)) if found.group(2) is not None else start
    if end < start:
        raise UsageError(f"--layers: {text!r} ends before it starts; accepted: START-END with START <= END")
    return range(start, end + 1)


def _split_overrides(args: argparse.Namespace) -> None:
    """Moves ``key=value`` items that ``--modules`` (nargs +) swallowed into the overrides."""
    modules = getattr(args, "modules", None) or []
    moved = [m for m in modules if _OVERRIDE.match(m)]
    args.overrides = [*(args.overrides or []), *moved]
    if modules:
        args.modules = [m for m in modules if not _OVERRIDE.match(m)]
        if not args.modules:
            raise UsageError(
                f"--modules: no pattern given ({moved} are key=value config overrides: a pattern cannot contain "
                "'='); accepted: one or more regular expressions without '='"
            )
    bad = [item for item in args.overrides if not _OVERRIDE.match(item)]
    if bad:
        raise UsageError(
            f"overrides: {bad} are not of the form key=value; accepted: config overrides such as "
            "data.val_sequences=64 or trainer.precision=bf16-mixed"
        )


def _check_overrides_read(args: argparse.Namespace) -> None:
    """merge and destroy read overrides only to evaluate (``--evaluate``) or to complete ``--config``'s model."""
    if args.overrides and not args.evaluate and args.config is None:
        raise UsageError(
            f"overrides {args.overrides}: nothing reads them without --evaluate or --config; accepted: none, or "
            "--evaluate (they change the evaluation's config)"
        )


def _check_output(path: str, overwrite: bool, inputs: Sequence[str], what: str = "--out") -> Path:
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{what}: {path} is a folder; accepted: a file path (e.g. merged.pt)")
    if any(out.resolve() == Path(p).resolve() for p in inputs):
        raise UsageError(f"{what}: {path} is one of the inputs; accepted: a new file path")
    if out.exists() and not overwrite:
        raise UsageError(f"{what}: {path} exists; accepted: a new path, or --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"{what}: {out.parent} is not a folder; accepted: a path in a folder")
    return out


def _named(argument: str, err: ValueError, key: str) -> UsageError:
    """A library error about one argument (its message starts ``key: ...``, as lowrank.checks words them) as the
    command line's ``argument: ...``."""
    text = str(err)
    return UsageError(f"{argument}: {text.removeprefix(key + ': ')}")


def _check_layers(state: Mapping[str, torch.Tensor], layers: range | None) -> None:
    """``--layers`` inside the model's decoder blocks (0 .. num_layers - 1)."""
    if layers is not None:
        try:
            names_by_module_type(state, layers)  # fails only for the layer range
        except ValueError as err:
            raise _named("--layers", err, "layers") from None


def _selected(state: Mapping[str, torch.Tensor], patterns: Sequence[str], layers: range | None) -> list[str]:
    """The names ``--modules`` selects within ``--layers``: a problem of the range is named ``--layers``, one of a
    pattern ``--modules``."""
    _check_layers(state, layers)
    try:
        return select(state, patterns, layers)
    except ValueError as err:
        raise _named("--modules", err, "patterns") from None


def _check_std(args: argparse.Namespace) -> None:
    """``--std`` (and ``--how``) as :func:`destroy_names` accepts them, checked on nothing before any weight is read."""
    try:
        destroy_names({}, [], args.how, args.seed, args.std)
    except ValueError as err:
        raise _named("--std", err, "std") from None


# ---------------------------------------------------------------------------------------------------------- weights
@dataclasses.dataclass
class Loaded:
    """Weights read from the command line with their model config (checked to fit)."""

    weights: ModelWeights
    config: LlamaConfig | None  # None only for delta's inputs whose heads are unknown

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.weights.state


def _load(path: str, argument: str, fallback: dict[str, Any] | None = None) -> Loaded:
    try:
        weights = load_model_weights(path)
        config = weights.llama_config(fallback)
    except WeightsError as err:
        raise UsageError(f"{argument}: {err}") from None
    problems = check_compatible(weights.state, config)
    if problems:
        shown = first_problems(problems)
        raise UsageError(
            f"{argument}: {path} ({weights.kind}) does not fit its model config {config}: {shown}; accepted: LLaMA "
            "weights in the recipe's layout"
        )
    return Loaded(weights, config)


def _load_any(path: str, argument: str) -> Loaded:
    """Weights whose model config may stay unknown (delta compares tensors only: no heads needed)."""
    try:
        weights = load_model_weights(path)
    except WeightsError as err:
        raise UsageError(f"{argument}: {err}") from None
    try:
        config = weights.llama_config()
    except WeightsError:
        config = None
    return Loaded(weights, config)


def _fallback_model(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``model`` section of ``--config`` with the overrides (what foreign weights' shapes do not say: heads,
    maximum length)."""
    run = _config_run(args)
    return None if run is None else dataclasses.asdict(run.model)


def _written_run_config(loaded: Loaded, config: LlamaConfig) -> dict[str, Any]:
    """The run config an output carries: the input's (its model section set to ``config``), or for foreign weights
    just ``{"model": config}``, so that the output says its own shape."""
    run_config = copy.deepcopy(loaded.weights.run_config) if loaded.weights.run_config else {}
    run_config["model"] = {**run_config.get("model", {}), **dataclasses.asdict(config)}
    return run_config


def _describe(loaded: Loaded) -> str:
    count = sum(t.numel() for t in loaded.state.values())
    layers = f"{loaded.config.num_layers} layers, " if loaded.config is not None else ""
    return f"{loaded.weights.path} ({loaded.weights.kind}, {layers}{count:,} parameters)"


# ------------------------------------------------------------------------------------------------------- evaluation
def _quoted(value: str | Path) -> str:
    """``value`` as a YAML single-quoted string: an override's value read as this string, whatever its characters."""
    return "'" + str(value).replace("'", "''") + "'"


def _evaluation_overrides(args: argparse.Namespace) -> list[str]:
    """The command line's ``key=value`` overrides, then ``--tokenizer`` as ``data.tokenizer`` (it wins)."""
    overrides = list(args.overrides or [])
    if getattr(args, "tokenizer", None) is not None:
        if not Path(args.tokenizer).exists():
            raise UsageError(f"--tokenizer: {args.tokenizer} does not exist; accepted: a local tokenizer.json")
        overrides.append(f"data.tokenizer={_quoted(args.tokenizer)}")
    return overrides


def _machine_neutral(folder: Path) -> list[str]:
    """Overrides appended last to every evaluation config: the keys that only concern a training run on some machine
    (where it writes, what it resumes or starts from, which accelerator it asks for), which evaluation never reads,
    set to values that validate anywhere (a GPU run's config on a CPU machine, an out_dir or init_from of another
    machine). ``--device`` picks the evaluation's device."""
    return [f"out_dir={_quoted(folder / 'out')}", "resume=auto", "model.init_from=null", "trainer.accelerator=auto"]


def _validated_run(config: str | Mapping[str, Any], overrides: Sequence[str], source: str) -> RunConfig:
    """:func:`load_run_config` of a config name or path, or :func:`run_config_from_mapping` of a run config mapping
    (a checkpoint's), with ``overrides`` and :func:`_machine_neutral`; its errors become usage errors."""
    from lowrank_recipes.recipes.config import ConfigError, load_run_config, run_config_from_mapping

    with tempfile.TemporaryDirectory(prefix="lowrank-diagnose-") as folder:  # the neutral out_dir, never written
        every = [*overrides, *_machine_neutral(Path(folder))]
        try:
            if isinstance(config, str):
                run, _ = load_run_config(config, every)
            else:
                run, _ = run_config_from_mapping(dict(config), every)
        except ConfigError as err:
            message = str(err)
            raise UsageError(message if message.startswith("--config") else f"{source}: {message}") from None
    return run


def _config_run(args: argparse.Namespace) -> RunConfig | None:
    """``--config`` with the overrides and ``--tokenizer``, validated once per command; None without ``--config``."""
    if getattr(args, "config", None) is None:
        return None
    if getattr(args, "config_run", None) is None:
        args.config_run = _validated_run(args.config, _evaluation_overrides(args), f"--config {args.config}")
    return args.config_run


def _device(text: str | None) -> str:
    """``--device``: a device of this machine (default: cuda when present, else cpu)."""
    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    accepted = "cpu, cuda, cuda:N (N below the GPU count) or mps, one this machine has"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: invalid value {text!r}; accepted: {accepted}") from None
    present = {
        "cpu": True,
        "cuda": (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not present.get(device.type, False):
        raise UsageError(f"--device: {text!r} is not a device of this machine; accepted: {accepted}")
    return text


@dataclasses.dataclass
class Evaluator:
    """The validation batches, precision and device every model of one command is evaluated with."""

    batches: Any  # ValidationBatches
    precision: str
    device: str
    source: str

    def __call__(
        self,
        loaded: Loaded | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
        config: LlamaConfig | None = None,
    ) -> Evaluation:
        """The loss of ``loaded`` (or of ``state`` under ``config``) on the batches."""
        from lowrank_recipes.recipes.validation_loss import validation_loss

        state = loaded.state if state is None and loaded is not None else state
        config = loaded.config if config is None and loaded is not None else config
        try:
            return validation_loss(state, config, self.batches, self.precision, self.device)
        except ValueError as err:
            raise UsageError(f"evaluate: {err}") from None

    def describe(self) -> str:
        b = self.batches
        sequences = sum(batch["input_ids"].shape[0] for batch in b.batches)
        return (
            f"validation data of {self.source}: {len(b.batches)} batches, {sequences} sequences of "
            f"{b.batches[0]['input_ids'].shape[1]} tokens; precision {self.precision}; device {self.device}"
        )


def build_evaluator(loaded: Loaded, args: argparse.Namespace) -> Evaluator:
    """The recipe's validation data for ``loaded``: its run config's data section, or ``--config``'s; overrides and
    ``--tokenizer`` applied, validated by the recipe's loader. Weights without a data section need both ``--config``
    and ``--tokenizer``."""
    from lowrank_recipes.recipes.validation_loss import ValidationBatches

    run_config = loaded.weights.run_config or {}
    own_data = isinstance(run_config.get("data"), dict)
    if not own_data and (args.config is None or args.tokenizer is None):
        missing = " and ".join(k for k, v in (("--config", args.config), ("--tokenizer", args.tokenizer)) if v is None)
        raise UsageError(
            f"{missing}: required to evaluate {loaded.weights.path}: these {loaded.weights.kind} weights hold no "
            "recipe run config with a data section; accepted: --config NAME_OR_YAML (a recipe config whose data "
            "section gives the validation data) and --tokenizer PATH (the model's own tokenizer.json)"
        )
    if args.limit_batches is not None and args.limit_batches < 1:
        raise UsageError(f"--limit-batches: invalid value {args.limit_batches}; accepted: an integer >= 1")
    device = _device(args.device)
    if args.config is not None:
        run, source = _config_run(args), f"--config {args.config}"
    else:
        source = f"the run config of {loaded.weights.path}"
        run = _validated_run(run_config, _evaluation_overrides(args), source)
    limit = args.limit_batches if args.limit_batches is not None else run.trainer.limit_val_batches
    try:
        batches = ValidationBatches(run.data, limit if limit else None)
    except Exception as err:  # the data pipeline's own errors: missing files, offline Hub names, bad tokenizers
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"data ({source}): the validation data could not be built ({cause})") from None
    try:
        batches.check(loaded.config)
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from None
    return Evaluator(batches, run.trainer.precision, device, source)


def _needs_evaluation(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "evaluate", False))


def _row(name: str, result: Any, reference: Any | None = None) -> str:
    delta = "" if reference is None else f"{result.loss - reference.loss:+.4f}"
    return f"| {name} | {result.loss:.4f} | {result.ppl:.4g} | {delta} |"


def _table(rows: list[tuple[str, Any]], reference: Any | None) -> str:
    lines = ["| model | val/loss | val/ppl | change |", "|---|---:|---:|---:|"]
    lines += [_row(name, result, reference) for name, result in rows]
    return "\n".join(lines)


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _check_json(args: argparse.Namespace, inputs: Sequence[str], out: Path | None = None) -> None:
    if getattr(args, "json", None) is not None:
        path = _check_output(args.json, args.overwrite, inputs, "--json")
        if out is not None and path.resolve() == out.resolve():
            raise UsageError(f"--json: {args.json} is the --out path; accepted: another file (e.g. result.json)")


# -------------------------------------------------------------------------------------------------------- commands
def cmd_evaluate(args: argparse.Namespace) -> int:
    _check_json(args, [args.weights])
    loaded = _load(args.weights, "WEIGHTS", _fallback_model(args))
    evaluator = build_evaluator(loaded, args)
    result = evaluator(loaded)
    print(f"weights: {_describe(loaded)}")
    print(evaluator.describe())
    print(f"val/loss {result.loss:.6f}  val/ppl {result.ppl:.6g}")
    _write_json(args.json, {"weights": args.weights, "kind": loaded.weights.kind, **result.as_dict()})
    return 0


def _same_architecture(a: Loaded, b: Loaded) -> None:
    problems = architecture_problems(a.state, b.state)
    if problems:
        shown = first_problems(problems)
        raise UsageError(
            f"A and B: {a.weights.path} and {b.weights.path} have different architectures ({shown}); accepted: two "
            "checkpoints of one model shape"
        )


def _same_model(a: Loaded, b: Loaded) -> None:
    """A and B agree in the :data:`ARCHITECTURE_FIELDS` of their model configs (what the shapes do not show)."""
    if a.config is None or b.config is None:
        return
    differ = [
        f"model.{name} is {getattr(a.config, name)!r} in A and {getattr(b.config, name)!r} in B"
        for name in ARCHITECTURE_FIELDS
        if getattr(a.config, name) != getattr(b.config, name)
    ]
    if differ:
        raise UsageError(
            f"A and B: {a.weights.path} and {b.weights.path} are models of different architectures: "
            f"{'; '.join(differ)}; accepted: two checkpoints of one architecture (the same "
            f"{', '.join(ARCHITECTURE_FIELDS)}, as well as the same tensor shapes)"
        )


def cmd_delta(args: argparse.Namespace) -> int:
    from lowrank.module_delta import DeltaOptions, delta_option_problems
    from lowrank_recipes.recipes.checkpoints import step_of
    from lowrank_recipes.recipes.delta_report import REPORT_FILES, DeltaReport, write_report

    problems = delta_option_problems(args.threshold, args.bins)  # each named by its field: threshold, bins
    if problems:
        raise UsageError("; ".join(f"--{problem}" for problem in problems))
    options = DeltaOptions(threshold=args.threshold, bins=args.bins)
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UsageError(
                f"--out: {out} is a file; accepted: a folder (new or existing) for {', '.join(REPORT_FILES)}"
            )
        existing = [str(out / name) for name in REPORT_FILES if (out / name).exists()]
        if existing and not args.overwrite:
            raise UsageError(f"--out: {', '.join(existing)} exist; accepted: another folder, or --overwrite")
    if args.overrides:
        raise UsageError(f"overrides {args.overrides}: delta evaluates nothing; accepted: none")
    a, b = _load_any(args.a, "A"), _load_any(args.b, "B")
    _same_architecture(a, b)
    report = DeltaReport(a.state, b.state, options, {"A": args.a, "B": args.b})
    print(f"A: {_describe(a)}\nB: {_describe(b)}\n")
    print(report.type_table() + "\n\n" + report.layer_table())
    if out is not None:
        step = step_of(args.b)  # the heatmap's title: B's step when its name says it (step=N.ckpt), else 0
        try:
            written = write_report(report, out, step=0 if step is None else step)
        except ImportError as err:
            raise UsageError(
                f"--out: delta.png needs matplotlib ({err}); accepted: no --out, or pip install matplotlib"
            ) from None
        for path in written:
            print(f"wrote {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers)
    _check_overrides_read(args)
    out = _check_output(args.out, args.overwrite, [args.a, args.b])
    _check_json(args, [args.a, args.b], out)
    a = _load(args.a, "A", _fallback_model(args))
    b = _load(args.b, "B", dataclasses.asdict(a.config))
    _same_architecture(a, b)
    _same_model(a, b)
    _selected(a.state, args.modules, layers)
    try:
        merged, copied = merge_modules(a.state, b.state, args.modules, layers)
    except ValueError as err:  # selection checked above: only A and B can disagree here
        raise UsageError(f"A and B: {err}") from None
    evaluator = build_evaluator(a, args) if _needs_evaluation(args) else None
    rows: list[tuple[str, Evaluation]] = []
    if evaluator is not None:  # every model in memory, before anything is written
        rows = [("A", evaluator(a)), ("merged", evaluator(state=merged, config=a.config)), ("B", evaluator(b))]
    provenance = {
        "command": "merge",
        "a": args.a,
        "b": args.b,
        "kinds": [a.weights.kind, b.weights.kind],
        "patterns": list(args.modules),
        "layers": None if layers is None else [layers.start, layers.stop - 1],
        "copied": copied,
    }
    save_model_weights(out, merged, _written_run_config(a, a.config), provenance, overwrite=args.overwrite)
    print(f"A: {_describe(a)}\nB: {_describe(b)}")
    print(f"copied {len(copied)} tensors from B: {', '.join(copied)}")
    print(f"wrote {out}")
    if evaluator is not None:
        print(evaluator.describe())
        print(_table(rows, rows[0][1]))
        _write_json(args.json, {"out": str(out), **{name: r.as_dict() for name, r in rows}})
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers)
    if args.how == "remove":
        if args.modules:
            raise UsageError(
                f"--modules: not used with --how remove (whole layers are removed), got {args.modules}; accepted: "
                "--how remove --layers START-END alone, or --how zero|reinit with --modules"
            )
        if layers is None:
            raise UsageError("--layers: required with --how remove; accepted: START-END (inclusive) or one index")
    else:
        if not args.modules:
            raise UsageError(f"--modules: required with --how {args.how}; accepted: one or more regular expressions")
        _check_std(args)
    _check_overrides_read(args)
    out = _check_output(args.out, args.overwrite, [args.ckpt])
    _check_json(args, [args.ckpt], out)
    source = _load(args.ckpt, "CKPT", _fallback_model(args))
    config = source.config
    if args.how == "remove":
        try:
            state, count = remove_layers(source.state, layers, config.num_layers)
        except ValueError as err:
            raise _named("--layers", err, "layers") from None
        config = dataclasses.replace(config, num_layers=count)
        touched = [f"layers.{i}" for i in layers]
    else:
        touched = _selected(source.state, args.modules, layers)
        state = destroy_names(source.state, touched, args.how, args.seed, args.std)
    evaluator = build_evaluator(source, args) if _needs_evaluation(args) else None
    rows: list[tuple[str, Evaluation]] = []
    if evaluator is not None:  # both models in memory, before anything is written
        rows = [("intact", evaluator(source)), (f"{args.how}", evaluator(state=state, config=config))]
    provenance = {
        "command": "destroy",
        "source": args.ckpt,
        "kind": source.weights.kind,
        "how": args.how,
        "patterns": list(args.modules or []),
        "layers": None if layers is None else [layers.start, layers.stop - 1],
        "seed": args.seed,
        "std": args.std,
        "destroyed": touched,
    }
    save_model_weights(out, state, _written_run_config(source, config), provenance, overwrite=args.overwrite)
    print(f"source: {_describe(source)}")
    what = "removed" if args.how == "remove" else f"{args.how} ({len(touched)} tensors)"
    print(f"{what}: {', '.join(touched)}")
    print(f"wrote {out}")
    if evaluator is not None:
        print(evaluator.describe())
        print(_table(rows, rows[0][1]))
        _write_json(args.json, {"out": str(out), "intact": rows[0][1].as_dict(), "destroyed": rows[1][1].as_dict()})
    return 0


def cmd_destroy_table(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers)
    _check_std(args)
    _check_json(args, [args.ckpt])
    source = _load(args.ckpt, "CKPT", _fallback_model(args))
    _check_layers(source.state, layers)
    groups = names_by_module_type(source.state, layers)
    if args.modules:
        chosen = set(_selected(source.state, args.modules, layers))
        groups = {kind: names for kind, names in groups.items() if chosen.intersection(names)}
    evaluator = build_evaluator(source, args)
    intact = evaluator(source)
    rows: list[dict[str, Any]] = []
    for kind, names in groups.items():
        destroyed = destroy_names(source.state, names, args.how, args.seed, args.std)
        result = evaluator(state=destroyed, config=source.config)
        rows.append(
            {"module_type": kind, "tensors": len(names), **result.as_dict(), "increase": result.loss - intact.loss}
        )
    span = "every layer" if layers is None else f"layers {layers.start}-{layers.stop - 1}"
    print(f"source: {_describe(source)}\n{evaluator.describe()}\n{args.how} each module type across {span}\n")
    lines = ["| module type | tensors | val/loss | val/ppl | increase |", "|---|---:|---:|---:|---:|"]
    lines.append(f"| (intact) | 0 | {intact.loss:.4f} | {intact.ppl:.4g} | +0.0000 |")
    lines += [
        f"| {r['module_type']} | {r['tensors']} | {r['loss']:.4f} | {r['ppl']:.4g} | {r['increase']:+.4f} |"
        for r in rows
    ]
    print("\n".join(lines))
    _write_json(args.json, {"source": args.ckpt, "how": args.how, "intact": intact.as_dict(), "rows": rows})
    return 0


# ----------------------------------------------------------------------------------------------------------- parser
def _evaluation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--config", help="recipe config (path or name under configs/) giving the validation data")
    group.add_argument("--tokenizer", help="the model's tokenizer.json (required for weights without a run config)")
    group.add_argument("--limit-batches", type=int, help="validation batches (default: trainer.limit_val_batches)")
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides (data.val_sequences=64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank-diagnose",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("evaluate", help="validation loss and perplexity of weights")
    p.add_argument("weights", metavar="WEIGHTS")
    _evaluation_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser("delta", help="per-module weight change between checkpoints A and B")
    p.add_argument("a", metavar="A", help="the reference (e.g. the earlier checkpoint)")
    p.add_argument("b", metavar="B")
    p.add_argument("--out", help="folder for delta.md, delta.json, delta.png (default: print only)")
    p.add_argument("--threshold", type=float, default=1e-6, help="|w_A| below it: excluded from r (default 1e-6)")
    p.add_argument("--bins", type=int, default=50, help="histogram bins of clip(r, -1, 1) (default 50)")
    p.add_argument("--overwrite", action="store_true", help="replace existing report files")
    p.set_defaults(run=cmd_delta, overrides=[])

    p = commands.add_parser("merge", help="copy modules of B into A")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--modules", nargs="+", required=True, metavar="PATTERN", help="regular expressions over names")
    p.add_argument("--layers", metavar="START-END", help="only inside these decoder layers (inclusive)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--evaluate", action="store_true", help="report the val loss of A, the merged model and B")
    _evaluation_options(p)
    p.set_defaults(run=cmd_merge)

    p = commands.add_parser("destroy", help="zero, re-initialise or remove modules")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--how", required=True, choices=("zero", "reinit", "remove"))
    p.add_argument("--modules", nargs="+", metavar="PATTERN", help="regular expressions over names (zero, reinit)")
    p.add_argument("--layers", metavar="START-END", help="decoder layers (inclusive); required with --how remove")
    p.add_argument("--seed", type=int, default=0, help="seed of the reinit draws (default 0)")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the reinit draws (default 0.02)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--evaluate", action="store_true", help="report the val loss before and after")
    _evaluation_options(p)
    p.set_defaults(run=cmd_destroy)

    p = commands.add_parser("destroy-table", help="val loss after destroying each module type in turn")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--how", default="zero", choices=("zero", "reinit"))
    p.add_argument("--modules", nargs="+", metavar="PATTERN", help="only the module types these patterns match")
    p.add_argument("--layers", metavar="START-END", help="decoder layers (inclusive; default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _evaluation_options(p)
    p.set_defaults(run=cmd_destroy_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        # overrides may follow options (argparse fills a trailing positional only once): collect them from the rest
        args, rest = parser.parse_known_args(argv)
        unknown = [item for item in rest if not _OVERRIDE.match(item)]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*(getattr(args, "overrides", None) or []), *rest]
    except SystemExit as exit_:  # argparse's own usage errors (status 2, message printed) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else 0
    try:
        _split_overrides(args)
        return args.run(args)
    except UsageError as err:
        print(f"error: {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
