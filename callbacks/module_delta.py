"""``ModuleDeltaMonitor``: how far training has moved each module's weights from a reference (the "Delta" diagnostics
of the SfN study, arXiv 2505.20993), for any LightningModule and any optimizer.

For every followed parameter W with reference W_ref (the weights at the start of the run, or those of a checkpoint)
the monitor computes, with :mod:`lowrank.module_delta` (which states the math), the L2 change ``||W - W_ref||_F``, the
relative L2 change ``||W - W_ref||_F / ||W_ref||_F``, and the distribution of the element-wise relative change
``r = (w - w_ref) / w_ref`` over the elements with ``|w_ref| >= threshold`` and a finite r (the others are excluded: r
is undefined or meaningless there, or a NaN / inf weight): power sums (for Sarle's bimodality coefficient) and a
histogram of ``clip(r, -1, 1)``. A NaN or inf weight is never hidden: it shows in the L2 tags as NaN or inf (and makes
every ``share`` NaN). Module types are :func:`lowrank.names.module_types` over the followed names (``q_proj`` ...
``down_proj``; parents added where leaves collide), layers :func:`lowrank.names.layer_label` (``model.layers.3``).

Tags, every ``every_n_steps`` optimizer steps (``trainer.global_step % every_n_steps == 0``, after the step; once per
optimizer step under gradient accumulation), on rank zero, through every logger, ``step`` = ``trainer.global_step``:

* ``delta/<module_type>/l2``: ``sqrt(sum of ||W - W_ref||_F^2)`` over the type's weights;
* ``delta/<module_type>/relative_l2``: that over ``sqrt(sum of ||W_ref||_F^2)``;
* ``delta/<module_type>/share``: the type's share of the total squared change (all types add up to 1);
* ``delta/<module_type>/bimodality``: Sarle's coefficient of r over the type's included elements (> 5/9 suggests a
  bimodal distribution; left out when undefined: fewer than 4 elements or no spread, e.g. a frozen module);
* ``delta/<module_type>/excluded_fraction``: the fraction of the type's elements left out of r (``|w_ref| < threshold``
  or a non-finite r);
* ``delta_layer/<layer>/<module_type>/relative_l2``: per layer and type;
* histograms ``delta_hist/<layer>/<module_type>`` of ``clip(r, -1, 1)`` (``bins`` bins over [-1, 1], the computed
  counts as they are, through ``add_histogram_raw``) for the layers ``histogram_layers`` picks, to every logger whose
  ``experiment`` has ``add_histogram_raw`` (TensorBoard); others are skipped silently;
* a heatmap image ``delta/heatmap`` (layers x module types of the relative L2 change,
  :mod:`lowrank_recipes.callbacks.module_delta_figure`) every ``image_every`` logs, to every logger whose
  ``experiment`` has ``add_image``.

With ``snapshot_dtype="bfloat16"`` only the L2 tags (``l2``, ``relative_l2``, ``share`` and the per-layer
``relative_l2``) are logged: a bf16 reference is rounded to 8 significant bits, relative error up to 2^-9 (~0.2%) per
element, so r cannot be resolved below ~0.4% and its histograms and bimodality would show the rounding, not the
training. The L2 metrics carry the same rounding: ``relative_l2`` values below ~0.3% are at the noise floor.

Snapshot memory (the reference, kept on the CPU): 4 bytes per followed element in float32, 2 in bfloat16; under DDP
(replicated weights) on global rank 0 only (the other ranks hold nothing and compute nothing); under FSDP2 (parameters
are DTensors) each rank holds its own local shards (``param.to_local()``), computes per-shard deltas, and the additive
statistics (squared norms, counts, power sums, histograms) are summed over the ranks with one
``torch.distributed.all_reduce`` of a flat float64 tensor and one of an int64 tensor; rank 0 logs. A replicated mesh
dimension (HSDP) is counted once (only its coordinate-0 ranks contribute); a plain (non-DTensor) parameter is held
whole and counted by global rank 0 only (the other ranks add an empty delta for it). The computation itself runs
parameter by parameter in float64 chunks on the parameter's device.

Resuming: with ``reference="start"`` the snapshot is part of the callback's ``state_dict()`` (tensors and plain
containers: ``torch.load(weights_only=True)`` reads the checkpoint), so a resumed run keeps measuring from the
original start, not from the resume point. Under FSDP2 the shards are gathered for that (``full_tensor()``, one
parameter at a time, kept on rank 0: rank 0's CPU then holds the whole snapshot while the checkpoint is written), and
a resumed rank takes its own shard back from it. Lightning restores callback state on every rank (each loads the
checkpoint and gets a copy of the state), so on a DDP resume every rank briefly holds the snapshot until training
starts; then rank 0 keeps it and the others drop it. Lightning calls ``load_state_dict`` only when the checkpoint holds
state for this callback: a monitor first added when a run resumes takes that resumed start as its reference, silently.
A checkpoint whose monitor state holds no snapshot (its run's monitor had a checkpoint file as ``reference``, or the
checkpoint was written before training started) gives the same reference, with a warning. With a checkpoint path the
reference is re-read from the file.

POET models (:func:`lowrank.poet.apply_poet`) are refused: their effective weights ``W = R W0 P`` are not parameters;
``lowrank-diagnose delta`` compares POET checkpoints offline as their effective weights.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from typing_extensions import override

from lowrank.checks import check, is_int, join_accepted, raise_problems
from lowrank.module_delta import (
    DeltaOptions,
    ParameterDelta,
    bin_edges,
    by_layer_and_module_type,
    by_module_type,
    delta_option_problems,
    empty_delta,
    pack_deltas,
    parameter_delta,
    unpack_deltas,
)
from lowrank.names import layer_label, module_types
from lowrank.poet_linear import POETLinear
from lowrank.randomness import normalize_param_name
from lowrank_recipes.callbacks.module_delta_figure import render_delta_heatmap
from lowrank_recipes.callbacks.overlap_figure import natural_key

IMAGE_TAG = "delta/heatmap"
SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_TITLE = "ModuleDeltaMonitor"
_MAX_LISTED = 20  # problems listed in one error
REFERENCE_ACCEPTED = (
    "'start' or the path of a single checkpoint file readable by torch.load(weights_only=True) (a Lightning "
    "checkpoint or a plain state dict; from an fsdp2 run, one written with trainer.checkpoint_format=full)"
)
POET_REFUSAL = (
    f"{_TITLE}: the module holds POET layers (W = R W0 P: the effective weights are not parameters); accepted: a model "
    "without POETLinear layers; compare POET checkpoints offline with `lowrank-diagnose delta`, which reads them as "
    "their effective weights"
)


def monitor_problems(
    reference: Any,
    every_n_steps: Any,
    histogram_layers: Any,
    threshold: Any,
    bins: Any,
    snapshot_dtype: Any,
    names: Any,
    image_every: Any,
    prefix: str = "",
) -> list[str]:
    """Every invalid :class:`ModuleDeltaMonitor` argument, each problem starting with ``f"{prefix}{argument}: "``
    and naming the value and the accepted values (``prefix="delta."`` gives ``"delta.bins: invalid value 0; accepted:
    an integer >= 1"``), in the order of the arguments; ``[]`` when every argument is valid.

    Cheap: nothing is loaded. A ``reference`` other than ``"start"`` must be the path of an existing regular file (a
    directory, e.g. a sharded checkpoint, is refused); whether it is readable and matches the module is checked in
    ``setup``.
    """
    patterns = [names] if isinstance(names, str) else names
    valid_reference = isinstance(reference, (str, os.PathLike)) and os.fspath(reference) != ""
    problems = [
        *check(valid_reference, "reference", reference, REFERENCE_ACCEPTED),
        *(_reference_file_problems(os.fspath(reference)) if valid_reference and reference != "start" else []),
        *check(is_int(every_n_steps, 1), "every_n_steps", every_n_steps, "an integer >= 1"),
        *check(
            histogram_layers is None
            or (
                isinstance(histogram_layers, Sequence)
                and not isinstance(histogram_layers, str)
                and all(is_int(i) for i in histogram_layers)
            ),
            "histogram_layers",
            histogram_layers,
            "None or a sequence of layer indices (integers)",
        ),
        *delta_option_problems(threshold, bins),
        *check(snapshot_dtype in SNAPSHOT_DTYPES, "snapshot_dtype", snapshot_dtype, join_accepted(SNAPSHOT_DTYPES)),
        *_pattern_problems(patterns),
        *check(image_every is None or is_int(image_every, 1), "image_every", image_every, "an integer >= 1 or None"),
    ]
    return [f"{prefix}{p}" for p in problems]  # each problem starts with its argument's name


class ModuleDeltaMonitor(pl.Callback):
    """Logs per-module weight change against a reference (module docstring).

    Args:
        reference: ``"start"``: the weights when training starts (the first run's; kept across resumes through the
            callback's state), or the path of a single checkpoint file readable by ``torch.load(weights_only=True)``:
            a Lightning checkpoint (its ``"state_dict"``, keys as in the LightningModule's ``state_dict()``) or a
            plain state dict; a directory (a sharded checkpoint) is refused. That the file exists is checked here;
            keys and shapes in ``setup``, before any training.
        every_n_steps: log when ``trainer.global_step % every_n_steps == 0`` after an optimizer step.
        histogram_layers: indices of the layers whose r histograms are logged, into the naturally sorted labels of
            the numbered layers (labels ending in a layer index, ``model.layers.0`` ... ``model.layers.11``; all layer
            labels when none is numbered); negative indices count from the end. Default (None): the first, the middle
            (``n // 2``) and the last layer; ``()``: no histograms.
        threshold: elements with ``|w_ref| < threshold`` are excluded from r, as are those whose r is not finite
            (:class:`lowrank.module_delta.DeltaOptions`).
        bins: histogram bins over [-1, 1].
        snapshot_dtype: ``"float32"`` (exact for float32, bf16 and fp16 weights) or ``"bfloat16"`` (half the memory,
            L2 tags only: module docstring).
        names: regular expressions (``re.search`` on the parameter name) choosing the followed parameters (any
            floating-point parameter that matches one); default (None): every floating-point parameter with 2 or more
            dimensions (the weight matrices and embeddings; norms and biases are left out), trainable or frozen.
        image_every: draw the heatmap every this many logs (1: at every log); None: never.

    Raises:
        ValueError: for invalid arguments (in ``__init__``, all of them at once: :func:`monitor_problems`), or in
            ``setup`` / ``on_train_start`` for a module holding POET layers (``POETLinear``), a reference that does
            not match the followed parameters (naming the keys and shapes), histogram layer indices out of range, or
            ``names`` that match nothing.
    """

    def __init__(
        self,
        reference: str | os.PathLike = "start",
        every_n_steps: int = 100,
        histogram_layers: Sequence[int] | None = None,
        threshold: float = 1e-6,
        bins: int = 50,
        snapshot_dtype: str = "float32",
        names: Sequence[str] | str | None = None,
        image_every: int | None = 1,
    ) -> None:
        super().__init__()
        raise_problems(
            _TITLE,
            monitor_problems(
                reference, every_n_steps, histogram_layers, threshold, bins, snapshot_dtype, names, image_every
            ),
        )
        patterns = [names] if isinstance(names, str) else names
        self.reference = "start" if reference == "start" else os.fspath(reference)
        self.every_n_steps = every_n_steps
        self.histogram_layers = None if histogram_layers is None else tuple(histogram_layers)
        self.options = DeltaOptions(threshold=threshold, bins=bins)
        self.snapshot_dtype = snapshot_dtype
        self.patterns = None if patterns is None else [re.compile(p) for p in patterns]
        self.image_every = image_every
        self.logs = 0  # how many times the monitor has logged (kept across resumes; image_every counts them)
        self._snapshot: dict[str, Tensor] | None = None  # name -> CPU reference (local shard under FSDP2)
        self._pending: dict[str, Tensor] | None = None  # full reference from a checkpoint or file, placed at start
        self._names: list[str] = []
        self._types: dict[str, str] = {}
        self._layers: dict[str, str] = {}
        self._histogram_labels: set[str] = set()
        self._sharded = False
        self._rank = 0
        self._module: pl.LightningModule | None = None
        self._last_step: int | None = None
        self._images_disabled = False

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._rank = trainer.global_rank
        if not any(True for _ in pl_module.parameters()):
            return  # built in configure_model: checked in on_train_start
        self._select(pl_module)
        if self.reference != "start":
            self._pending = self._read_reference_file(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(pl_module, trainer.global_rank)
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step since the last call (gradient accumulation)
            return
        self._last_step = step
        if step % self.every_n_steps != 0:
            return
        deltas = self.compute(pl_module)
        if deltas is not None and trainer.global_rank == 0:
            self._log(trainer, deltas, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"reference": self.reference, "snapshot_dtype": self.snapshot_dtype, "logs": self.logs}
        if self.reference == "start":
            state["snapshot"] = self._full_snapshot()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.logs = int(state_dict.get("logs", 0))
        if self.reference != "start":
            return  # the file is the reference
        snapshot = state_dict.get("snapshot") or {}
        if snapshot:
            self._snapshot = None
            self._pending = dict(snapshot)
            if state_dict.get("snapshot_dtype") == "bfloat16" and self.snapshot_dtype == "float32":
                rank_zero_warn(
                    f"{_TITLE}: the checkpoint's start snapshot was saved in bfloat16: the resumed run's float32 "
                    "reference is bf16-rounded, so relative changes below ~0.4% are not resolved"
                )
        else:  # reached when the checkpoint holds this monitor's state without a snapshot (module docstring)
            rank_zero_warn(
                f"{_TITLE}: the checkpoint's monitor state holds no start snapshot (that run's monitor had a "
                "checkpoint file as reference, or the checkpoint was written before training started): the reference "
                "is the weights at the resume point; to measure from elsewhere, pass that checkpoint file as reference"
            )

    # ------------------------------------------------------------------------------------------------ the work
    def prepare(self, pl_module: pl.LightningModule, rank: int) -> None:
        """Chooses the followed parameters and holds the reference: the pending one (from a checkpoint's state or the
        reference file), the one already held (a second ``fit`` of the same callback), else the current weights."""
        self._rank = rank
        self._module = pl_module
        self._select(pl_module)
        params = dict(pl_module.named_parameters())
        self._sharded = any(isinstance(params[name], DTensor) for name in self._names)
        if self._pending is None and self._snapshot is None and self.reference != "start":
            self._pending = self._read_reference_file(pl_module)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._snapshot = self._place(pending, params)
        elif self._snapshot is not None:
            kept = [n for n in self._names if self._keeps(params[n])]
            unknown = sorted(set(kept) - set(self._snapshot))
            if unknown:
                raise ValueError(
                    f"{_TITLE}: the reference snapshot (taken in an earlier fit of this monitor) has no "
                    f"{_listed(unknown)}; accepted: the parameters that fit followed (the same module and names); "
                    "for another module or other names, use a new ModuleDeltaMonitor"
                )
        else:
            dtype = SNAPSHOT_DTYPES[self.snapshot_dtype]
            keep = [n for n in self._names if self._keeps(params[n])]
            self._snapshot = {n: _local(params[n]).detach().to(device="cpu", dtype=dtype, copy=True) for n in keep}

    def compute(self, pl_module: pl.LightningModule) -> list[ParameterDelta] | None:
        """Every followed parameter's delta (module-wide under FSDP2: summed over the ranks, a collective every rank
        must call), or None on a rank that holds no reference (DDP, rank > 0)."""
        if self._snapshot is None:
            raise RuntimeError(f"{_TITLE}: compute() before on_train_start: no reference held yet")
        if not self._sharded and self._rank != 0:
            return None
        params = dict(pl_module.named_parameters())
        deltas = []
        for name in self._names:
            param, kind, layer = params[name], self._types[name], self._layers[name]
            if self._contributes(param):
                deltas.append(parameter_delta(name, _local(param), self._snapshot[name], self.options, kind, layer))
            else:
                deltas.append(empty_delta(name, self.options.bins, kind, layer))
        if self._sharded:
            stats, histograms = pack_deltas(deltas)
            device = next((_local(params[n]).device for n in self._names if isinstance(params[n], DTensor)), None)
            stats, histograms = stats.to(device), histograms.to(device)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            dist.all_reduce(histograms, op=dist.ReduceOp.SUM)
            deltas = unpack_deltas(deltas, stats, histograms)
        return deltas

    def metrics(self, deltas: list[ParameterDelta]) -> dict[str, float]:
        """The scalar tags of ``deltas`` (module docstring); without the r tags for a bf16 snapshot."""
        with_r = self.snapshot_dtype != "bfloat16"
        out: dict[str, float] = {}
        for kind, t in by_module_type(deltas).items():
            out[f"delta/{kind}/l2"] = t.l2
            out[f"delta/{kind}/relative_l2"] = t.relative_l2
            out[f"delta/{kind}/share"] = t.share
            if with_r:
                if math.isfinite(t.bimodality):
                    out[f"delta/{kind}/bimodality"] = t.bimodality
                out[f"delta/{kind}/excluded_fraction"] = t.excluded_fraction
        for (layer, kind), cell in by_layer_and_module_type(deltas).items():
            out[f"delta_layer/{layer}/{kind}/relative_l2"] = cell.relative_l2
        return out

    # ------------------------------------------------------------------------------------------------ helpers
    def _select(self, pl_module: pl.LightningModule) -> None:
        """The followed names, their types and layers, and the histogram layers (raises for a bad choice, and for a
        POET model: its effective weights are not parameters)."""
        if any(isinstance(module, POETLinear) for module in pl_module.modules()):
            raise ValueError(POET_REFUSAL)
        named = [(n, p) for n, p in pl_module.named_parameters() if p.is_floating_point()]
        if self.patterns is None:
            names = [n for n, p in named if p.ndim >= 2]
        else:
            names = [n for n, _ in named if any(pattern.search(n) for pattern in self.patterns)]
        if not names:
            accepted = "patterns matching at least one floating-point parameter"
            shown = [pattern.pattern for pattern in self.patterns] if self.patterns is not None else None
            raise ValueError(
                f"{_TITLE}: names: {shown!r} follows no parameter of {type(pl_module).__name__} "
                f"(parameters: {_listed([n for n, _ in named])}); accepted: {accepted}"
            )
        self._names = names
        self._types = module_types(names)
        self._layers = {name: layer_label(name) for name in names}
        labels = sorted(set(self._layers.values()), key=natural_key)
        numbered = [label for label in labels if label.split(".")[-1].isdigit()] or labels
        chosen = (0, len(numbered) // 2, -1) if self.histogram_layers is None else self.histogram_layers
        bad = [i for i in chosen if not -len(numbered) <= i < len(numbered)]
        if bad:
            raise ValueError(
                f"{_TITLE}: histogram_layers: indices {bad} out of range for {len(numbered)} layers "
                f"({_listed(numbered)}); accepted: integers in [{-len(numbered)}, {len(numbered) - 1}]"
            )
        self._histogram_labels = {numbered[i] for i in chosen}

    def _read_reference_file(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The followed names' tensors of the reference checkpoint (memory-mapped where the format allows), checked
        against the module's parameter shapes (global shapes for DTensors)."""
        path = self.reference
        accepted = REFERENCE_ACCEPTED
        raise_problems(_TITLE, _reference_file_problems(path))  # checked in __init__; it may have gone since
        try:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not the zip format: mmap is unavailable
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any failure to read is the same refusal
            raise ValueError(f"{_TITLE}: reference: cannot read {path!r} ({error}); accepted: {accepted}") from error
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(
                f"{_TITLE}: reference: {path!r} holds no state dict (a Lightning checkpoint's 'state_dict' or a "
                f"mapping of names to tensors); accepted: {accepted}"
            )
        by_normalized = {normalize_param_name(k): k for k in state}
        params = dict(pl_module.named_parameters())
        problems, found = [], {}
        for name in self._names:
            key = name if name in state else by_normalized.get(normalize_param_name(name))
            expected = tuple(params[name].shape)
            if key is None:
                problems.append(f"{name!r} missing")
            elif tuple(state[key].shape) != expected:
                problems.append(f"{name!r} has shape {tuple(state[key].shape)} there, {expected} in the module")
            else:
                found[name] = state[key]
        if problems:
            raise ValueError(
                f"{_TITLE}: reference: {path!r} does not match the followed parameters: {_listed(problems)}; "
                "accepted: a checkpoint of this LightningModule (the same parameter names and shapes)"
            )
        return found

    def _place(self, full: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The snapshot this rank holds from full reference tensors (:meth:`_keeps`): copies in the snapshot dtype of
        this rank's shards of DTensors (every rank) and of the whole plain tensors (global rank 0 only)."""
        problems = []
        for name in self._names:
            if name not in full:
                problems.append(f"{name!r} missing")
            elif tuple(full[name].shape) != tuple(params[name].shape):
                problems.append(f"{name!r} has shape {tuple(full[name].shape)}, {tuple(params[name].shape)} here")
        if problems:
            raise ValueError(
                f"{_TITLE}: the start snapshot of the checkpoint's monitor state does not match the followed "
                f"parameters: {_listed(problems)}; accepted: a snapshot of the same parameters (resume with the module "
                "and names of the run that wrote the checkpoint), or a checkpoint file as reference"
            )
        dtype = SNAPSHOT_DTYPES[self.snapshot_dtype]
        placed = {}
        for name in self._names:
            param, tensor = params[name], full[name]
            if not self._keeps(param):
                continue
            if isinstance(param, DTensor):
                tensor = _shard_of(tensor, param)
            placed[name] = tensor.detach().to(device="cpu", dtype=dtype, copy=True)
        return placed

    def _full_snapshot(self) -> dict[str, Tensor]:
        """The snapshot as whole tensors (gathered under FSDP2, a collective; rank 0 keeps them, other ranks return
        an empty dict); the pending reference when training has not started."""
        if self._pending is not None:
            return dict(self._pending)
        if self._snapshot is None:
            return {}
        if not self._sharded:
            return dict(self._snapshot)
        assert self._module is not None
        params = dict(self._module.named_parameters())
        full = {}
        for name in self._names:
            param = params[name]
            if isinstance(param, DTensor):  # a collective: every rank holds its shard
                device = param.to_local().device
                whole = DTensor.from_local(
                    self._snapshot[name].to(device),
                    param.device_mesh,
                    param.placements,
                    shape=param.shape,
                    stride=param.stride(),
                ).full_tensor()
                if self._rank == 0:
                    full[name] = whole.cpu()
            elif self._rank == 0:  # a plain parameter: held whole by rank 0 only, nothing to gather
                full[name] = self._snapshot[name]
        return full

    def _keeps(self, param: Tensor) -> bool:
        """Whether this rank holds the reference of ``param``: a DTensor's local shard on every rank (its statistics
        are summed over the ranks, and the checkpoint's gather needs every shard); a plain parameter on global rank 0
        only (the only rank that computes and logs it: under DDP every parameter, under FSDP2 the unsharded ones)."""
        return isinstance(param, DTensor) or self._rank == 0

    def _contributes(self, param: Tensor) -> bool:
        """Whether this rank's part of ``param`` enters the sum: a DTensor's shard once per replicated mesh dimension
        (its coordinate 0 there), a plain tensor on rank 0."""
        if not isinstance(param, DTensor):
            return self._rank == 0
        coordinate = param.device_mesh.get_coordinate()
        if coordinate is None:
            return False
        return all(c == 0 for c, p in zip(coordinate, param.placements) if not isinstance(p, Shard))

    def _log(self, trainer: pl.Trainer, deltas: list[ParameterDelta], step: int) -> None:
        self.logs += 1
        metrics = self.metrics(deltas)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        experiments = [getattr(logger, "experiment", None) for logger in trainer.loggers]
        cells = by_layer_and_module_type(deltas)
        if self.snapshot_dtype != "bfloat16":
            writers = [e for e in experiments if callable(getattr(e, "add_histogram_raw", None))]
            for (layer, kind), cell in cells.items():
                if layer in self._histogram_labels and cell.included > 0:
                    for writer in writers:
                        _add_histogram(writer, f"delta_hist/{layer}/{kind}", cell.histogram, step)
        if self.image_every is not None and self.logs % self.image_every == 0 and not self._images_disabled:
            writers = [e for e in experiments if callable(getattr(e, "add_image", None))]
            if writers:
                self._draw(writers, {key: cell.relative_l2 for key, cell in cells.items()}, step)

    def _draw(self, writers: list[Any], cells: dict[tuple[str, str], float], step: int) -> None:
        try:
            image = render_delta_heatmap(cells, step)
        except ImportError:
            self._images_disabled = True
            rank_zero_warn(
                f"{_TITLE}: matplotlib is not installed, so no heatmap is drawn "
                "(pip install matplotlib, or image_every=None to silence this)"
            )
            return
        for writer in writers:
            writer.add_image(IMAGE_TAG, image, step, dataformats="HWC")


def _add_histogram(writer: Any, tag: str, counts: Tensor, step: int) -> None:
    """The computed counts (bins,) over [-1, 1] as a TensorBoard histogram: bucket limits = the right bin edges;
    min/max = the edges of the outermost non-empty bins; sum / sum of squares from the bin centres (what is drawn)."""
    bins = counts.numel()
    edges = bin_edges(bins)  # (bins + 1,)
    centres = (edges[:-1] + edges[1:]) / 2  # (bins,)
    values = counts.to(torch.float64)  # (bins,)
    filled = torch.nonzero(counts).flatten()
    writer.add_histogram_raw(
        tag,
        min=float(edges[filled[0]]),
        max=float(edges[filled[-1] + 1]),
        num=int(counts.sum()),
        sum=float((values * centres).sum()),
        sum_squares=float((values * centres * centres).sum()),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def _local(param: Tensor) -> Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _shard_of(full: Tensor, param: DTensor) -> Tensor:
    """This rank's part of the whole tensor ``full`` placed like ``param`` (no communication: every rank has it)."""
    device = param.to_local().device
    try:
        shard = distribute_tensor(full.to(device), param.device_mesh, param.placements, src_data_rank=None)
    except TypeError:  # torch < 2.6: no src_data_rank; a scatter from rank 0 gives the same part
        shard = distribute_tensor(full.to(device), param.device_mesh, param.placements)
    local = shard.to_local()
    if tuple(local.shape) != tuple(param.to_local().shape):
        raise ValueError(
            f"{_TITLE}: the reference's shard has shape {tuple(local.shape)}, the parameter's local shard "
            f"{tuple(param.to_local().shape)}; accepted: parameters sharded like distribute_tensor does (FSDP2)"
        )
    return local


def _reference_file_problems(path: str) -> list[str]:
    """The problem of a reference path that is not an existing regular file (existence and kind only: no loading)."""
    if os.path.isfile(path):
        return []
    if os.path.isdir(path):
        what = "a directory: a sharded checkpoint is not accepted"
    elif os.path.exists(path):
        what = "not a regular file"
    else:
        what = "no such file"
    return [f"reference: invalid value {path!r} ({what}); accepted: {REFERENCE_ACCEPTED}"]


def _pattern_problems(patterns: Any) -> list[str]:
    accepted = "None, or regular expressions (strings) matched with re.search against parameter names"
    if patterns is None:
        return []
    if not isinstance(patterns, Sequence) or not patterns or not all(isinstance(p, str) for p in patterns):
        return check(False, "names", patterns, accepted)
    problems = []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            problems += check(False, "names", pattern, f"{accepted} ({error})")
    return problems


def _listed(items: list[str]) -> str:
    """The first ``_MAX_LISTED`` items, comma-separated, and how many more."""
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown
