"""The low-rank optimizer: a base optimizer run on projected gradients.

For a low-rank weight W (m, n) with gradient G and basis B (d, r) (see :mod:`lowrank.projector` for the side rule):

    R     = project(G, B)                        # (r, n) left, (m, r) right
    U     = base.step(R)                         # base update of R, e.g. Adam: -lr * m_hat / (sqrt(v_hat) + eps)
    W    <- W - lr * wd * W                      # decoupled weight decay on the full weight
    W    <- W + alpha * back_project(U, B)       # = W - lr * alpha * back_project(Adam(R))
    W    <- W - lr * S                           # only with ``fira=True``: full-rank residual (lowrank.fira)

Every parameter of a group without ``rank`` (embeddings, head, norms) gets the plain base update with the group's
learning rate. The base optimizer (AdamW by default; Adam, Adafactor or any factory) keeps its moments in the
projected shape; the moment policy (``keep`` | ``rotate`` | ``reset``, :mod:`lowrank.moments`) says what happens to
them when B changes.

Bases are refreshed from the current gradient on the optimizer's :class:`lowrank.RefreshSchedule`
(``self.schedule``: update gap, stagger, selector switch; a function of the step and the parameter's place), the one
owner of when refreshes happen, on every path:

* :meth:`step` first runs the refreshes due at this step, unless :meth:`resample` already ran them for this step (a
  Lightning ``SubspaceResampler`` does, in ``on_before_optimizer_step``, to time them);
* per-layer updates (:mod:`lowrank.per_layer`, :meth:`step_parameter`) refresh a parameter inside backward when the
  schedule says it is due;
* :meth:`due` answers before a step's forward pass which parameters refresh at a step and with which selector.

A parameter without a basis gets one at its first step with a gradient. Every draw follows the randomness rule of
:mod:`lowrank.randomness`. Refresh listeners (:meth:`register_refresh_listener`) are called once after every optimizer
step that refreshed at least one basis, with that step's :class:`lowrank.RefreshRecord` s (under per-layer updates
without the old bases, which are dropped as soon as the overlap is known).

Per-layer updates run the same update one parameter at a time inside backward; ``step`` then only advances the
counters (and calls the listeners), the gradients being gone.

FSDP2 (``fully_shard``): parameters that are row-sharded DTensors (``Shard(0)``) always project on the ``right``
(``side='auto'`` means right for them, ``'left'`` is refused): projection and back-projection run on the local shard,
the stand-in (and so the base's moments) is a DTensor sharded like the weight, the basis a ``Replicate()`` DTensor
refreshed identically on every rank from the full gradient, gathered on refresh steps only (a collective: every rank
must step or ``resample`` together). See :mod:`lowrank.dtensor`. ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` work on this state, sharded or with
``full_state_dict=True`` (whole tensors gathered on rank 0, then ``broadcast_from_rank0``); their loader's
zero-gradient step creates placeholder bases and, with Fira, a zero ``fira_norm``, so that every entry is loaded.

State is per parameter and tensor-only, so ``torch.load(weights_only=True)`` works: the base's entries (``step``,
``exp_avg``, ...) plus ``lowrank_basis`` (d, r) and, with Fira, ``fira_norm`` (0-dim). The step counter of a
low-rank group is the group entry ``lowrank_step`` (an int).

One class holds the ordinary step, the per-layer step (``step_parameter``, lowrank.per_layer) and the refresh: they
share its private state (stand-ins, bases, the step's due set and pending records).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch.utils.hooks import RemovableHandle

from lowrank.bases import BaseFactory, BaseSpec, resolve_base
from lowrank.checks import check, is_number, raise_problems
from lowrank.compact_adamw import STORAGE_KEYS
from lowrank.dtensor import (
    check_row_sharded,
    gather_full,
    global_norm,
    is_dtensor,
    like_rows,
    local,
    replicate_like,
    sharded_zeros_like_rows,
)
from lowrank.fira import fira_residual
from lowrank.moments import apply_moment_policy
from lowrank.options import LOWRANK_DEFAULTS, OPTION_NAMES, lowrank_problems
from lowrank.projector import add_back_projected_, orient, placeholder_basis, project, projected_shape, resolve_side
from lowrank.randomness import draw_generator, resolve_seed
from lowrank.records import RefreshRecord
from lowrank.regroup import regroup_by_name
from lowrank.schedule import RefreshSchedule, as_schedule
from lowrank.selectors import SubspaceSelector, make_selector, selector_problems
from lowrank.split_refresh import SplitJob, run_split, world
from lowrank.vocabulary import OPTIMIZER_OPTIONS

_OWN_STATE_KEYS = ("lowrank_basis", "fira_norm")
# Options that older versions took per group or as constructor arguments, and where they live now.
MOVED_OPTIONS: dict[str, str] = {
    "update_gap": "moved to the optimizer's schedule: LowRankOptimizer(..., schedule=RefreshSchedule(update_gap=...))",
    "oversampling": "moved to selector_options, by rule: "
    "selector_options={'randomized_importance': {'oversampling': ..}}",
    "power_iters": "moved to selector_options, by rule: "
    "selector_options={'randomized_importance': {'power_iters': ..}}",
    "auto_refresh": "removed: step() refreshes what its schedule says is due, unless resample() already ran that step",
}

RefreshListener = Callable[["LowRankOptimizer", list[RefreshRecord]], None]
"""``listener(optimizer, records)``: called after every optimizer step that refreshed at least one basis."""


class DueRefresh(NamedTuple):
    """A parameter the schedule refreshes at a step, and the selector it is refreshed with."""

    name: str
    selector: str


class _Todo(NamedTuple):
    group: dict[str, Any]
    name: str
    param: torch.Tensor
    step: int
    selector: str


class _Unrefreshed(NamedTuple):
    name: str
    step: int
    kept_old_basis: bool  # False: a placeholder basis was installed


def unrefreshed_message(step: int, entries: list[_Unrefreshed]) -> str:
    """The one warning of a refresh at ``step`` that skipped ``entries``: every parameter named, grouped by what it
    got instead (its old basis, or a placeholder)."""
    kept = [repr(e.name) for e in entries if e.kept_old_basis]
    placeholder = [repr(e.name) for e in entries if not e.kept_old_basis]
    parts = [f"{', '.join(kept)}: the old basis is kept"] if kept else []
    parts += [f"{', '.join(placeholder)}: a placeholder basis (first axes) is used"] if placeholder else []
    return (
        f"lowrank: the gradient of {len(entries)} parameter(s) is all zero or non-finite at step {step}, so they "
        f"were not refreshed: {'; '.join(parts)}"
    )


def _moved(keys: Iterable[str], where: str) -> list[str]:
    """Options that moved (``MOVED_OPTIONS``) or are another project's word (GaLore's ``scale``, ...)."""
    moved = [f"{where}{k}: {MOVED_OPTIONS[k]}" for k in keys if k in MOVED_OPTIONS]
    return moved + [f"{where}{k}: {OPTIMIZER_OPTIONS[k]}" for k in keys if k in OPTIMIZER_OPTIONS]


class LowRankOptimizer(torch.optim.Optimizer):
    """Runs ``base`` on low-rank projections of the gradients of every parameter in groups that set ``rank``.

    Args:
        params: parameters or groups. Groups may set any option of :class:`lowrank.LowRankOptions`, ``lr``,
            ``weight_decay``, the base's own hyperparameters and ``param_names`` (names seed the draws and appear in
            warnings and records).
        lr: learning rate.
        weight_decay: decoupled weight decay (applied to the full weight of low-rank parameters); a group's own
            ``weight_decay`` wins (:func:`lowrank.build_optimizer` gives 0 to its ``*_no_decay`` groups: norms, biases,
            ``no_decay`` patterns; :mod:`lowrank.decay`).
        base: ``"adamw"`` (default), ``"adam"``, ``"adafactor"``, a registered name, a ``BaseSpec``, or a factory
            ``f(param_groups, **base_options) -> Optimizer``.
        base_options: keyword arguments of the base (e.g. ``betas``, ``eps``, ``foreach``).
        schedule: when bases refresh (:class:`lowrank.RefreshSchedule`, or a mapping of its fields); default: every
            200 steps, all at once, no selector switch.
        **lowrank: defaults of :class:`lowrank.LowRankOptions` for every group (``rank`` here makes every group
            low-rank; ``seed`` None or absent: ``PL_GLOBAL_SEED``, else 0, resolved now and kept in the groups).

    Attributes:
        schedule: the refresh schedule (assignable: callbacks fill in ``max_steps``).
        group_table: set by :func:`lowrank.build_optimizer`: which parameter went where.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        base: str | BaseSpec | BaseFactory = "adamw",
        base_options: dict[str, Any] | None = None,
        schedule: RefreshSchedule | Mapping[str, Any] | None = None,
        **lowrank: Any,
    ) -> None:
        unknown = sorted(set(lowrank) - set(OPTION_NAMES))
        if unknown:
            moved = _moved(unknown, "")
            raise ValueError(
                "; ".join(moved) if moved else f"unknown option(s) {unknown}; accepted: {', '.join(OPTION_NAMES)}"
            )
        self.spec = resolve_base(base)
        self._base_options = dict(base_options or {})
        probe = self.spec.factory([torch.zeros(1)], lr=lr, **self._base_options)  # validates the base options
        # The base's own hyperparameters (betas, eps, ...) live in the user's groups too, so schedulers can change
        # them; a base key that collides with a low-rank key (RMSprop's ``alpha``) is left to the base's default.
        own = {"lr", "weight_decay", *LOWRANK_DEFAULTS}
        self._base_keys = tuple(key for key in probe.defaults if key not in own)
        base_defaults = {key: probe.defaults[key] for key in self._base_keys}
        defaults = {**base_defaults, "lr": lr, "weight_decay": weight_decay, **LOWRANK_DEFAULTS, **lowrank}
        defaults["seed"] = resolve_seed(defaults["seed"]).value  # None: PL_GLOBAL_SEED, else 0 (lowrank.randomness)
        self._schedule = as_schedule(schedule)
        self.group_table: Any = None
        self._stand_ins: dict[torch.Tensor, torch.Tensor] = {}
        self._companions: dict[torch.Tensor, torch.Tensor] = {}  # projected gradients: weight -> companion
        self._base: torch.optim.Optimizer | None = None
        self._selectors: dict[tuple[Any, ...], SubspaceSelector] = {}
        # Refreshes: whether resample() already ran this step's scheduled refreshes (step() then does not), the
        # records waiting for the listeners (delivered after the step), the listeners.
        self._scheduled_done = False
        self._pending: list[RefreshRecord] = []
        self._unrefreshed: list[_Unrefreshed] = []  # refreshes refused for a zero gradient: one warning per step
        self._listeners: OrderedDict[int, RefreshListener] = OrderedDict()
        # Per-layer updates (lowrank.per_layer): the active updater, whether the base groups were synced this step,
        # the ids of the parameters due this step, and where each tensor sits: param -> (group index, index in group),
        # for our groups and the base's.
        self.per_layer: Any = None
        self._synced_this_step = False
        self._due_this_step: dict[int, str] | None = None
        self._where: dict[torch.Tensor, tuple[int, int]] = {}
        self._base_where: dict[torch.Tensor, tuple[int, int]] = {}
        super().__init__(params, defaults)
        self._base = self.spec.factory(self._base_groups(self.param_groups), **self._base_options)

    @property
    def schedule(self) -> RefreshSchedule:
        return self._schedule

    @schedule.setter
    def schedule(self, value: RefreshSchedule | Mapping[str, Any]) -> None:
        self._schedule = as_schedule(value)

    # ----------------------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        raise_problems("invalid parameter group", _moved(param_group, "group option "))
        if "param_names" not in param_group and not any(isinstance(p, tuple) for p in params):
            index = len(self.param_groups)
            param_group["param_names"] = [f"group{index}.param{i}" for i in range(len(params))]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        companions = [g for g in self.param_groups[:-1] if g.get("companions")]
        for other in companions:  # the companions' group stays last: the other groups keep their positions
            self.param_groups.remove(other)
            self.param_groups.append(other)
        if group.get("companions"):
            return  # projected gradients' companions: stepped through the weights they stand in for
        if group["seed"] is None:  # a group's own seed=None: resolved like the optimizer's default
            group["seed"] = resolve_seed(None).value
        self._validate_group(group)
        if group["rank"] is not None:
            group.setdefault("lowrank_step", 0)
            for param in group["params"]:
                side = _side(group, param)
                shape = projected_shape(param.shape, side, group["rank"])
                # Workspace the base steps on: zero before each step, the base's update of R after it. A plain
                # tensor's storage exists only during its update (_materialize / _release): between steps it would
                # be one more projected-gradient-sized tensor per weight (at 7B, rank 1024, bf16: 3.2 GB). For an
                # FSDP2 weight a DTensor (m, r) sharded like it, so that the base's moments are sharded too; kept.
                if is_dtensor(param):
                    self._stand_ins[param] = sharded_zeros_like_rows(param, group["rank"])
                else:
                    stand_in = torch.empty(shape, dtype=param.dtype, device=param.device)
                    self._stand_ins[param] = _release(stand_in)
        if self._base is not None:
            for base_group in self._base_groups([group]):
                self._base.add_param_group(base_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Every problem of a group in one ValueError: the shared option check plus what only the parameters tell."""
        problems = check(is_number(group["lr"]) and group["lr"] >= 0, "lr", group["lr"], "a number >= 0")
        wd = group["weight_decay"]
        problems += check(is_number(wd) and wd >= 0, "weight_decay", wd, "a number >= 0")
        if "betas" in group:
            betas = tuple(group["betas"])
            problems += check(
                len(betas) == 2 and all(is_number(b) and 0.0 <= b < 1.0 for b in betas),
                "betas",
                betas,
                "two numbers in [0, 1)",
            )
        problems += lowrank_problems(group, "", rotatable=self.spec.rotatable)
        if group["rank"] is not None and not problems:
            problems += _param_problems(group)
        raise_problems("invalid parameter group", problems)

    def _base_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The base's view of ``groups``: stand-ins replace low-rank parameters, in the same order."""
        out = []
        for group in groups:
            if group.get("companions"):
                continue
            hyper = {key: group[key] for key in self._base_keys if key in group}
            hyper.update(lr=group["lr"], weight_decay=group["weight_decay"])
            if group["rank"] is None:
                out.append({"params": list(group["params"]), **hyper})
                continue
            hyper["weight_decay"] = 0.0  # applied to the full weight instead
            stand_ins = [self._stand_ins[p] for p in group["params"]]
            chunks = [[s] for s in stand_ins] if self.spec.relative_step else [stand_ins]
            out.extend({"params": chunk, **hyper} for chunk in chunks)
        return out

    def _sync_base_groups(self) -> None:
        """Copies hyperparameters (a scheduler may have changed ``lr``) from the user's groups to the base's."""
        base_groups = iter(self._base.param_groups)
        for group in self.param_groups:
            if group.get("companions"):
                continue
            lowrank = group["rank"] is not None
            owners = group["params"] if lowrank and self.spec.relative_step else [None]
            for weight in owners:
                base_group = next(base_groups)
                for key in self._base_keys:
                    if key in group:
                        base_group[key] = group[key]
                base_group["lr"] = group["lr"]
                base_group["weight_decay"] = 0.0 if lowrank else group["weight_decay"]
                if weight is not None:
                    self.spec.prepare_group(base_group, weight, group["eps"])

    def _selector(self, group: dict[str, Any], name: str) -> SubspaceSelector:
        """The rule ``name`` with the group's options for it (``selector_options[name]``), built once."""
        options = group["selector_options"].get(name, {})
        cache_key = (name, tuple(sorted(options.items())))
        if cache_key not in self._selectors:
            self._selectors[cache_key] = make_selector(name, **options)
        return self._selectors[cache_key]

    # ------------------------------------------------------------------------------------------------ refresh
    def _lowrank_params(self) -> Iterable[tuple[dict[str, Any], str, torch.Tensor]]:
        for group in self.param_groups:
            if group["rank"] is not None:
                yield from ((group, name, p) for name, p in zip(group["param_names"], group["params"]))

    def _scheduled(self, step: int | None, selector: str | None = None) -> list[_Todo]:
        """What the schedule refreshes at ``step`` (None: each group's ``lowrank_step``), in the optimizer's order: the
        parameters whose place is due, and those without a basis yet."""
        params = list(self._lowrank_params())
        todo = []
        for place, (group, name, param) in enumerate(params):
            at = group["lowrank_step"] if step is None else step
            if self._schedule.is_due(at, place, len(params)) or "lowrank_basis" not in self.state.get(param, {}):
                todo.append(
                    _Todo(group, name, param, at, selector or self._schedule.selector_at(at, group["selector"]))
                )
        return todo

    def due(self, step: int | None = None) -> list[DueRefresh]:
        """The parameters refreshed at optimizer step ``step`` (default: the coming one, each group's ``lowrank_step``)
        and their selectors, known before the step's forward pass: the schedule's due places plus the parameters
        without a basis yet. (A due parameter whose gradient is then missing, zero or non-finite is not refreshed.)"""
        return [DueRefresh(t.name, t.selector) for t in self._scheduled(step)]

    def register_refresh_listener(self, listener: RefreshListener) -> RemovableHandle:
        """Calls ``listener(optimizer, records)`` after every optimizer step that refreshed at least one basis, with
        that step's records, on every rank; never inside backward. Returns a handle whose ``remove()`` unregisters it
        (as ``register_step_post_hook`` does)."""
        handle = RemovableHandle(self._listeners)
        self._listeners[handle.id] = listener
        return handle

    def _deliver(self) -> None:
        records, self._pending = self._pending, []
        if records:
            for listener in list(self._listeners.values()):
                listener(self, records)

    @torch.no_grad()
    def resample(
        self,
        step: int | None = None,
        params: Iterable[torch.Tensor | str] | None = None,
        selector: str | None = None,
        split_across_ranks: bool | None = None,
    ) -> list[RefreshRecord]:
        """Refreshes bases from the current gradients: what the schedule says is due at ``step``, or ``params``.

        Without ``params`` this is the step's scheduled refresh, run early (Lightning's ``SubspaceResampler`` calls it
        in ``on_before_optimizer_step`` to time it): the following :meth:`step` does not refresh again. With
        ``params`` it is a manual refresh outside the schedule. The records go to the listeners after the next step.

        Args:
            step: the optimizer step the refresh belongs to (seeds the draws, picks the due set and the selector);
                default: each group's ``lowrank_step``, the number of steps taken so far.
            params: parameters (tensors or names) to refresh now, whether due or not.
            selector: a rule name overriding the schedule's for this refresh.
            split_across_ranks: DDP (plain tensors, identical gradients on every rank of the default process
                group): each rank computes a round-robin share of the new bases and broadcasts them
                (:mod:`lowrank.split_refresh`); a collective, so every rank must call it with the same arguments. No
                effect without an initialised process group of several ranks; refused for DTensor (FSDP2) parameters.
                None: the schedule's ``split_across_ranks``.

        Returns:
            One record per refreshed parameter (old and new basis, overlap). Parameters without a gradient, or with
            an all-zero or non-finite one (one warning per refresh names them all; the old basis is kept), are not
            refreshed.
        """
        if self.per_layer is not None:
            raise RuntimeError(
                "lowrank: resample() cannot run with per-layer updates: the gradients are freed inside backward; the "
                "optimizer refreshes each basis itself inside backward on its schedule"
            )
        if selector is not None:
            raise_problems("resample", selector_problems(selector, {}, "selector"))
        if params is None:
            todo = self._scheduled(step, selector)
            # the coming step's scheduled refresh has run (step() will not run it again) only if this was that step
            self._scheduled_done = all(
                step is None or group["lowrank_step"] == step
                for group in self.param_groups
                if group["rank"] is not None
            )
        else:
            wanted = {p if isinstance(p, str) else id(p) for p in params}
            todo = [
                _Todo(group, name, param, at, selector or self._schedule.selector_at(at, group["selector"]))
                for group, name, param in self._lowrank_params()
                if name in wanted or id(param) in wanted
                for at in [group["lowrank_step"] if step is None else step]
            ]
        split = self._schedule.split_across_ranks if split_across_ranks is None else split_across_ranks
        return self._run(todo, split)

    def _run(self, todo: list[_Todo], split: bool) -> list[RefreshRecord]:
        """Refreshes ``todo`` (split across ranks or not) and queues the records for the listeners; weights with
        projected gradients then get R = project(G, B) on their (new) basis and lose G."""
        self._reduce_full_gradients()
        if split and world()[1] > 1:
            records = self._resample_split([t for t in todo if t.param.grad is not None])
        else:
            records = [self._refresh(t) for t in todo]
        records = [record for record in records if record is not None]
        self._pending.extend(records)
        self._warn_unrefreshed()
        self._reproject_companions()
        return records

    def _warn_unrefreshed(self) -> None:
        """One warning per refresh step naming every parameter it could not refresh (all-zero or non-finite
        gradient), instead of one warning per parameter."""
        entries, self._unrefreshed = self._unrefreshed, []
        for step in sorted({entry.step for entry in entries}):
            warnings.warn(unrefreshed_message(step, [e for e in entries if e.step == step]), stacklevel=4)

    def _resample_split(self, todo: list[_Todo]) -> list[RefreshRecord | None]:
        """A split refresh on several ranks: the selections run in ``run_split``, then every rank installs every basis
        (moment policy, state, record) as an unsplit refresh does."""
        jobs = []
        for t in todo:
            if is_dtensor(t.param):
                raise ValueError(
                    f"split_across_ranks: parameter {t.name!r} is a DTensor (FSDP2), whose basis every "
                    "rank computes from the gathered gradient; accepted with DTensors: False"
                )
            oriented, select = self._selection(t)
            dtype = torch.promote_types(oriented.dtype, torch.float32)  # holds the selector's fp32 (or wider) output
            jobs.append(SplitJob(select, (oriented.shape[0], t.group["rank"]), oriented.device, dtype))
        return [self._install(t, basis) for t, basis in zip(todo, run_split(jobs))]

    def _refresh(self, todo: _Todo) -> RefreshRecord | None:
        if todo.param.grad is None:
            return None
        _, select = self._selection(todo)
        return self._install(todo, select())

    def _selection(self, todo: _Todo) -> tuple[torch.Tensor, Callable[[], torch.Tensor | None]]:
        """(oriented gradient (d, k), the draw of the new basis, not yet run) for one parameter: the full gradient
        (FSDP2: gathered, on refresh steps only, so every rank draws the same basis) oriented by the side rule, and
        the generator of (seed, step, name)."""
        group = todo.group
        selector = self._selector(group, todo.selector)
        generator = draw_generator(group["seed"], todo.step, todo.name)
        oriented = orient(gather_full(todo.param.grad), _side(group, todo.param))
        return oriented, functools.partial(selector.select, oriented, group["rank"], generator)

    def _install(self, todo: _Todo, new_basis: torch.Tensor | None) -> RefreshRecord | None:
        """Makes ``new_basis`` (None: no refresh, keep the old basis or create a placeholder) the parameter's basis,
        applying the moment policy; the refresh's record, or None when nothing was refreshed."""
        group, name, param, step = todo.group, todo.name, todo.param, todo.step
        state = self.state[param]
        side = _side(group, param)
        old_basis = state.get("lowrank_basis")
        if new_basis is None:
            # torch.distributed.checkpoint creates a fresh optimizer's state with one lr-0 step on zero gradients
            # (every resume of a sharded checkpoint): its placeholders are expected, so that case stays silent.
            if old_basis is not None or float(group["lr"]) != 0.0:
                self._unrefreshed.append(_Unrefreshed(name, step, old_basis is not None))
            if old_basis is None:
                device = local(param).device
                placeholder = placeholder_basis(param.shape, side, group["rank"], dtype=param.dtype, device=device)
                state["lowrank_basis"] = replicate_like(placeholder, param) if is_dtensor(param) else placeholder
            return None
        # contiguous: a selector may return a strided view of the SVD output, and matmuls reading the two layouts
        # can differ in the last bit; one layout keeps split, unsplit and resumed refreshes bitwise alike
        new_basis = new_basis.to(dtype=param.dtype, device=local(param).device).contiguous()
        if is_dtensor(param):
            new_basis = replicate_like(new_basis, param)
        if old_basis is not None:
            base_state = self._base.state[self._stand_ins[param]]
            apply_moment_policy(
                group["moment_policy"],
                base_state,
                old_basis,
                new_basis,
                side,
                self.spec.first_moment_keys,
                self.spec.second_moment_keys,
            )
        state["lowrank_basis"] = new_basis
        old_basis = None if old_basis is None else local(old_basis)  # records hold plain (replicated) tensors
        return RefreshRecord(name, step, todo.selector, side, old_basis, local(new_basis))

    # --------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step (module docstring). The closure, if any, runs before any gradient is read."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_base_groups()
        if not self._scheduled_done:  # under per-layer updates only weights without a hook still have a gradient
            self._run(self._scheduled(None), self._schedule.split_across_ranks)
        active = []  # (group, param, stand-in, basis, side)
        one_by_one = []  # projected gradients (lowrank.projected): R is the companion's gradient
        for group, name, param in self._lowrank_params():
            if param in self._companions:
                entry = self._companion_entry(group, name, param)
                one_by_one.extend([] if entry is None else [entry])
                continue
            if param.grad is None:
                self._stand_ins[param].grad = None
                continue
            active.append(self._project_grad(group, name, param, zero=False))
        # The base's update lands in zeroed stand-ins: one foreach call zeroes them all (one zero_ per weight cost a
        # GPU step of the 60m shapes about 10%: bench/optimizer_step.py).
        if active:
            torch._foreach_zero_([local(entry[2]) for entry in active])
        held = [entry[2].grad for entry in one_by_one]
        for entry in one_by_one:
            entry[2].grad = None  # out of the batched step
        self._base.step()
        for entry in active:
            self._apply_update(*entry)
            entry[2].grad = None
            _release(entry[2])
        # Projected gradients: one weight at a time, so that one stand-in (the base's R-sized workspace) exists at a
        # time instead of one per weight (at 7B, rank 1024, bf16: 3.2 GB); the companions become hollow (_hollow)
        for entry, grad in zip(one_by_one, held):
            stand_in, companion = entry[2], self._companions[entry[1]]
            _materialize(stand_in).zero_()
            stand_in.grad = grad
            self._base_step_on(stand_in)
            self._apply_update(*entry)
            stand_in.grad = companion.grad = None
            _release(stand_in)
            _hollow(companion)
        for group in self.param_groups:
            if group["rank"] is not None:
                group["lowrank_step"] += 1
        self._synced_this_step = False
        self._scheduled_done = False
        self._due_this_step = None
        self._warn_unrefreshed()  # first bases in _project_grad, per-layer refreshes inside backward
        self._deliver()
        return loss

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Updates one parameter from its current gradient as :meth:`step` would (refresh when the schedule says so,
        base step, update), without advancing any step counter: the :meth:`step` after the backward finishes the
        optimizer step (it only advances the counters and calls the listeners, the gradients being gone). Per-layer
        updates (:mod:`lowrank.per_layer`) call it inside backward, one parameter at a time; the caller frees the
        gradient afterwards. A refresh's record is kept without its old basis until the step ends."""
        if param.grad is None:
            return
        if not self._synced_this_step:  # once per step, before any update (as in step)
            self._sync_base_groups()
            self._synced_this_step = True
        gi, pi = _locate(self._where, self.param_groups, param)
        group = self.param_groups[gi]
        if group["rank"] is None:
            self._base_step_on(param)
            return
        if self._due_this_step is None:  # the due set of this step, computed at its first weight
            self._due_this_step = {id(t.param): t.selector for t in self._scheduled(None)}
        name = group["param_names"][pi]
        selector = self._due_this_step.pop(id(param), None)
        if selector is not None:
            record = self._refresh(_Todo(group, name, param, group["lowrank_step"], selector))
            if record is not None:  # the overlap is computed; the old basis is freed now, not at the step's end
                self._pending.append(dataclasses.replace(record, old_basis=None))
        entry = self._project_grad(group, name, param)
        self._base_step_on(entry[2])
        self._apply_update(*entry)
        entry[2].grad = None
        _release(entry[2])

    def _companion_entry(
        self, group: dict[str, Any], name: str, param: torch.Tensor
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor, str] | None:
        """The update entry of a weight with projected gradients: on the steps that formed G (a refresh, a first
        basis) R = project(G, B) on the basis just installed (backward left zeros there), and G is freed;
        otherwise the companion's gradient as it is, handed to the stand-in."""
        companion = self._companions[param]
        if param.grad is not None:
            entry = self._project_grad(group, name, param, zero=False)
            param.grad = None
            return entry
        if companion.grad is None:
            return None
        self._stand_ins[param].grad = companion.grad
        return group, param, self._stand_ins[param], self.state[param]["lowrank_basis"], _side(group, param)

    # ------------------------------------------------------------------------------------- projected gradients
    def _reduce_full_gradients(self) -> None:
        """Averages over the ranks the full gradients G that backward accumulated into projected weights which do not
        require grad (under DDP they are kept out of DDP's reducer, lowrank.projected): one all-reduce per weight, on
        refresh steps only; every rank holds the same set (the schedule decides it)."""
        size = world()[1]
        if size == 1:
            return
        for param in self._companions:
            if param.grad is not None and not param.requires_grad and not is_dtensor(param):
                torch.distributed.all_reduce(param.grad)
                param.grad.div_(size)

    def _reproject_companions(self) -> None:
        """R = project(G, B) into the companion's gradient of every projected weight that holds G (a refresh or a
        first basis: backward left zeros there), then frees G; in place where the companion has a gradient (DDP's
        bucket view stays)."""
        for param, companion in self._companions.items():
            basis = self.state.get(param, {}).get("lowrank_basis")
            if param.grad is None or basis is None:
                continue
            side = self.side_of(param)
            if is_dtensor(param):  # FSDP2: R_i = G_i B on each row shard, a DTensor sharded like the companion
                gi, _ = _locate(self._where, self.param_groups, param)
                low = like_rows(project(local(param.grad), local(basis), side), param, self.param_groups[gi]["rank"])
            else:
                low = project(param.grad, basis, side)
            if companion.grad is None:
                companion.grad = low.to(companion.dtype)
            else:
                companion.grad.copy_(low)
            param.grad = None

    def projected_weights(self) -> list[torch.Tensor]:
        """The low-rank weights whose gradient backward forms in projected form (lowrank.projected)."""
        return list(self._companions)

    def side_of(self, param: torch.Tensor) -> str:
        """The projection side (left | right) of low-rank parameter ``param``."""
        gi, _ = _locate(self._where, self.param_groups, param)
        return _side(self.param_groups[gi], param)

    def attach_companion(self, param: torch.Tensor, companion: torch.Tensor) -> None:
        """Makes ``companion`` (R's shape, a parameter whose gradient backward fills with R: lowrank.projected) the
        holder of ``param``'s projected gradient: the step hands its gradient to ``param``'s stand-in."""
        expected = tuple(self._stand_ins[param].shape)
        if tuple(companion.shape) != expected or companion.dtype != self._stand_ins[param].dtype:
            raise ValueError(
                f"projected gradients: a companion of shape {tuple(companion.shape)} ({companion.dtype}) for a weight "
                f"whose projected gradient is {expected} ({self._stand_ins[param].dtype}); register the companions "
                "from the same optimizer config (rank, side) that builds the optimizer"
            )
        companion._lowrank_companion = True  # type: ignore[attr-defined]
        self._companions[param] = companion
        gi, pi = _locate(self._where, self.param_groups, param)
        name = self.param_groups[gi]["param_names"][pi] + "_projected"
        group = next((g for g in self.param_groups if g.get("companions")), None)
        if group is None:  # listed, so that zero_grad, AMP unscaling and gradient clipping see R
            self.add_param_group(
                {"params": [companion], "param_names": [name], "name": "projected", "companions": True}
            )
        else:
            group["params"].append(companion)
            group["param_names"].append(name)

    def detach_companion(self, param: torch.Tensor) -> None:
        """Ends projected gradients for ``param``: its gradient is the full one again."""
        companion = self._companions.pop(param)
        group = next(g for g in self.param_groups if g.get("companions"))
        index = next(i for i, p in enumerate(group["params"]) if p is companion)
        del group["params"][index], group["param_names"][index]
        if not group["params"]:
            self.param_groups.remove(group)

    def _project_grad(
        self, group: dict[str, Any], name: str, param: torch.Tensor, zero: bool = True
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """Sets the projected gradient as the stand-in's grad and, with ``zero``, the stand-in to zero (``step``
        zeroes all stand-ins at once instead). A parameter still without a basis (its first gradient came after its
        step's refresh, e.g. a manual ``resample``) gets one now, at its group's step."""
        stand_in = self._stand_ins[param]
        if "lowrank_basis" not in self.state[param]:
            step = group["lowrank_step"]
            record = self._refresh(_Todo(group, name, param, step, self._schedule.selector_at(step, group["selector"])))
            self._pending.extend([] if record is None else [record])
        basis = self.state[param]["lowrank_basis"]
        side = _side(group, param)
        _materialize(stand_in)
        if zero:
            stand_in.zero_()
        if is_dtensor(param):  # R_i = G_i B, local to each row shard
            stand_in.grad = like_rows(project(local(param.grad), local(basis), side), param, group["rank"])
        else:
            stand_in.grad = project(param.grad, basis, side)
        return group, param, stand_in, basis, side

    def _base_step_on(self, tensor: torch.Tensor) -> None:
        """Runs the base step on ``tensor`` alone: its base group, narrowed to it, is the base's only group meanwhile
        (the base's own rule and state, untouched for every other tensor)."""
        base = self._base
        gi, _ = _locate(self._base_where, base.param_groups, tensor)
        groups, group = base.param_groups, base.param_groups[gi]
        params = group["params"]
        group["params"], base.param_groups = [tensor], [group]
        try:
            base.step()
        finally:
            group["params"], base.param_groups = params, groups

    def _apply_update(
        self, group: dict[str, Any], param: torch.Tensor, stand_in: torch.Tensor, basis: torch.Tensor, side: str
    ) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        # FSDP2: everything below is local to the row shard (the local views share the DTensors' storage), except
        # Fira's norm, summed over the shards. For plain tensors local() is the tensor itself.
        sharded = is_dtensor(param)
        weight, low, basis = local(param), local(stand_in), local(basis)
        residual = None
        if group["fira"]:
            state = self.state[param]
            norm_dtype = torch.promote_types(param.dtype, torch.float32)
            # Created even at lr 0 (0 = no previous residual), so that the state of DCP's loader step (zero gradients,
            # lr 0) holds the entry and a checkpoint's fira_norm is loaded into it.
            prev = state.setdefault("fira_norm", torch.zeros((), dtype=norm_dtype, device=weight.device))
        if group["fira"] and lr > 0:
            psi = low / -lr  # the base's update direction with lr removed
            norm_fn = (lambda s: global_norm(s, param)) if sharded else None
            residual, state["fira_norm"] = fira_residual(
                local(param.grad), local(stand_in.grad), psi, basis, side, prev, group["fira_gamma"], norm_fn
            )
        if weight_decay != 0:
            weight.mul_(1 - lr * weight_decay)
        add_back_projected_(weight, low, basis, side, group["alpha"])
        if residual is not None:
            weight.add_(residual, alpha=-lr)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """torch.optim layout, one entry per parameter index: the base's state plus this optimizer's own."""
        outer = super().state_dict()
        # the companions' group (last, projected gradients) stays, without state: torch.distributed.checkpoint maps
        # the saved groups onto param_groups by position; load_state_dict drops it on either side
        base = self._base.state_dict()["state"]  # same parameter order, stand-ins in place of low-rank weights
        merged = {}
        for index in sorted(set(outer["state"]) | set(base)):
            merged[index] = {**base.get(index, {}), **outer["state"].get(index, {})}
        return {"state": merged, "param_groups": outer["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's loading (groups by position; a state dict of another group layout of the same named
        parameters, e.g. the former ``lowrank``/``plain`` one, is matched by name first: :mod:`lowrank.regroup`). The
        checkpoint's hyperparameters win, including the draw seed, so a resumed run draws what the uninterrupted run
        would have; storage options (state precision) are this optimizer's."""
        companions = [g for g in self.param_groups if g.get("companions")]
        self.param_groups[:] = [g for g in self.param_groups if not g.get("companions")]
        try:
            self._load_state_dict(state_dict)
        finally:
            self.param_groups.extend(companions)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a projected run's companions' group (last) has no state: an ordinary and a projected run load each other's
        saved_groups = [g for g in state_dict["param_groups"] if not g.get("companions")]
        state_dict = {**state_dict, "param_groups": saved_groups}
        state_dict = regroup_by_name(self, state_dict) or state_dict
        self._pending, self._scheduled_done, self._due_this_step = [], False, None  # nothing of a step in progress
        # As torch.optim does, state keys are matched to parameters by their order in the saved groups' "params"
        # (integers here, parameter names in torch.distributed.checkpoint's FSDP2 loader).
        position = {key: i for i, key in enumerate(k for g in state_dict["param_groups"] for k in g["params"])}
        own: dict[int, dict[str, torch.Tensor]] = {}
        base: dict[int, dict[str, Any]] = {}
        for key, entry in state_dict["state"].items():
            index = position.get(key, key)
            own[index] = {k: v for k, v in entry.items() if k in _OWN_STATE_KEYS}
            base[index] = {k: v for k, v in entry.items() if k not in _OWN_STATE_KEYS}
        # Storage options of the base (state precision, ...) are this run's configuration, not the checkpoint's: a
        # checkpoint saved with 8-bit states resumes with whatever precision this optimizer was built with.
        storage = [{k: g[k] for k in STORAGE_KEYS if k in g} for g in self.param_groups]
        # Options a checkpoint may lack: an empty selector_options does not survive torch.distributed.checkpoint's
        # flattening, and older checkpoints predate options; this optimizer's values fill them in.
        options = [{k: g[k] for k in OPTION_NAMES if k in g} for g in self.param_groups]
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        for group, kept, current in zip(self.param_groups, storage, options):
            group.update(kept)
            group.update({k: v for k, v in current.items() if k not in group})
            for moved in MOVED_OPTIONS:  # older checkpoints: options that live elsewhere now (the schedule)
                group.pop(moved, None)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in own.items():
            param = params[int(index)]
            for key, value in entry.items():  # dtype kept as saved (torch would cast fira_norm to the weight's)
                self.state[param][key] = value.to(device=param.device)
        self._base.load_state_dict({"state": base, "param_groups": self._base.state_dict()["param_groups"]})

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors with more than one dimension of data (moments, bases, quantisation
        scales); 0-dim scalars such as step counters are excluded."""
        total = 0
        for entry in self.state_dict()["state"].values():
            total += sum(v.numel() * v.element_size() for v in entry.values() if torch.is_tensor(v) and v.dim() > 0)
        return total


def _materialize(stand_in: torch.Tensor) -> torch.Tensor:
    """Gives a released stand-in its storage back (contents undefined: the caller zeroes it)."""
    if not is_dtensor(stand_in) and stand_in.untyped_storage().nbytes() == 0:
        stand_in.untyped_storage().resize_(stand_in.numel() * stand_in.element_size())
    return stand_in


def _hollow(companion: torch.Tensor) -> None:
    """Makes a companion's data a zero-stride view of one zero (no memory; readable, movable; autograd reads only its
    shape, DDP only its gradient). Done at the first step, after any data-parallel wrapper was built: DDP's broadcast
    at construction cannot write into such a view."""
    if companion.dim() and any(companion.stride()) and not is_dtensor(companion):  # FSDP2 shards it instead
        companion.data = torch.zeros((), dtype=companion.dtype, device=companion.device).expand(companion.shape)


def _release(stand_in: torch.Tensor) -> torch.Tensor:
    """Frees a plain stand-in's storage, keeping the tensor (its identity keys the base's state, its shape and
    dtype the base's checks); DTensor stand-ins keep theirs."""
    if not is_dtensor(stand_in):
        stand_in.untyped_storage().resize_(0)
    return stand_in


def _side(group: dict[str, Any], param: torch.Tensor) -> str:
    """The projection side of a low-rank parameter: the group's rule, but always ``right`` for a DTensor (FSDP2)."""
    if is_dtensor(param):
        return "right"
    return resolve_side(param.shape, group["side"])


def _locate(
    cache: dict[torch.Tensor, tuple[int, int]], groups: list[dict[str, Any]], tensor: torch.Tensor
) -> tuple[int, int]:
    """(group index, index in group) of ``tensor``; the cache is rebuilt when groups changed (add, load)."""
    where = cache.get(tensor)
    if where is None or where[0] >= len(groups) or not _holds(groups[where[0]]["params"], where[1], tensor):
        cache.clear()
        cache.update({p: (gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])})
        if tensor not in cache:
            shape = tuple(tensor.shape)
            raise ValueError(f"step_parameter: a tensor of shape {shape} is not a parameter of this optimizer")
        where = cache[tensor]
    return where


def _holds(params: list[torch.Tensor], index: int, tensor: torch.Tensor) -> bool:
    return index < len(params) and params[index] is tensor


def _param_problems(group: dict[str, Any]) -> list[str]:
    """What a low-rank group's parameters themselves refuse: not 2-D, a rank above min(m, n), FSDP2 layouts."""
    problems, rank = [], group["rank"]
    for name, param in zip(group["param_names"], group["params"]):
        if param.dim() != 2:
            problems.append(f"rank: parameter {name!r} has shape {tuple(param.shape)}; low-rank needs a 2-D weight")
        elif rank > min(param.shape):
            problems.append(
                f"rank: {rank} is larger than parameter {name!r} allows (shape {tuple(param.shape)}); "
                f"accepted: 1 .. {min(param.shape)}"
            )
        elif is_dtensor(param):
            check_row_sharded(param, name)
            if group["side"] == "left":
                problems.append(
                    f"side: 'left' is not supported for the DTensor (FSDP2) parameter {name!r}; accepted: right | "
                    "auto (which means right for DTensors: row-sharded weights project locally on the right)"
                )
    return problems
