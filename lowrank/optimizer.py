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

Bases are refreshed from the current gradient by :meth:`LowRankOptimizer.resample`, which a schedule (the
``SubspaceResampler`` callback) calls; without one (``auto_refresh=True``) the optimizer refreshes a group itself
every ``update_gap`` optimizer steps, counting from step 0, never both. A parameter without a basis gets one at its
first step with a gradient. Every draw follows the randomness rule of :mod:`lowrank.randomness`.

Per-layer updates (:mod:`lowrank.per_layer`) run the same update one parameter at a time inside backward
(:meth:`LowRankOptimizer.step_parameter`, refreshing on the ``update_gap`` schedule); ``step`` then only advances the
counters, the gradients being gone.

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

This file is longer than the project's ~300-line guideline on purpose: the ordinary step, the per-layer step
(``step_parameter``, lowrank.per_layer) and the refresh share the private state of one class.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lowrank.bases import BaseFactory, BaseSpec, resolve_base
from lowrank.compact_adamw import STORAGE_KEYS
from lowrank.dtensor import (
    check_row_sharded, gather_full, global_norm, is_dtensor, like_rows, local, replicate_like, sharded_zeros_like_rows,
)
from lowrank.fira import fira_residual
from lowrank.moments import MOMENT_POLICIES, apply_moment_policy
from lowrank.projector import SIDES, add_back_projected_, orient, placeholder_basis, project, projected_shape, resolve_side
from lowrank.randomness import draw_generator
from lowrank.records import RefreshRecord
from lowrank.selectors import SELECTORS, SubspaceSelector, make_selector
from lowrank.split_refresh import SplitJob, run_split, world

# Hyperparameters of low-rank groups, with their defaults. A group whose ``rank`` is None is a plain group.
LOWRANK_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "alpha": 0.25,
    "selector": "importance",
    "update_gap": 200,
    "side": "auto",
    "moment_policy": "keep",
    "fira": False,
    "fira_gamma": 1.01,
    "oversampling": 16,
    "power_iters": 2,
    "seed": 0,
}
_OWN_STATE_KEYS = ("lowrank_basis", "fira_norm")


def _check(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ValueError(f"{key}: invalid value {value!r}; accepted: {accepted}")


class LowRankOptimizer(torch.optim.Optimizer):
    """Runs ``base`` on low-rank projections of the gradients of every parameter in groups that set ``rank``.

    Args:
        params: parameters or groups. Groups may set any key of ``LOWRANK_DEFAULTS``, ``lr``, ``weight_decay``, the
            base's own hyperparameters and ``param_names`` (names seed the draws and appear in warnings).
        lr: learning rate.
        weight_decay: decoupled weight decay (applied to the full weight of low-rank parameters).
        base: ``"adamw"`` (default), ``"adam"``, ``"adafactor"``, a registered name, a ``BaseSpec``, or a factory
            ``f(param_groups, **base_options) -> Optimizer``.
        base_options: keyword arguments of the base (e.g. ``betas``, ``eps``, ``foreach``).
        auto_refresh: refresh bases every ``update_gap`` steps inside :meth:`step`. A schedule that calls
            :meth:`resample` sets it to False.
        **lowrank: defaults for ``LOWRANK_DEFAULTS`` keys (``rank`` here makes every group low-rank).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        base: str | BaseSpec | BaseFactory = "adamw",
        base_options: dict[str, Any] | None = None,
        auto_refresh: bool = True,
        **lowrank: Any,
    ) -> None:
        unknown = sorted(set(lowrank) - set(LOWRANK_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; accepted: {', '.join(LOWRANK_DEFAULTS)}")
        self.spec = resolve_base(base)
        self._base_options = dict(base_options or {})
        probe = self.spec.factory([torch.zeros(1)], lr=lr, **self._base_options)  # validates the base options
        # The base's own hyperparameters (betas, eps, ...) live in the user's groups too, so schedulers can change
        # them; a base key that collides with a low-rank key (RMSprop's ``alpha``) is left to the base's default.
        own = {"lr", "weight_decay", *LOWRANK_DEFAULTS}
        self._base_keys = tuple(key for key in probe.defaults if key not in own)
        base_defaults = {key: probe.defaults[key] for key in self._base_keys}
        defaults = {**base_defaults, "lr": lr, "weight_decay": weight_decay, **LOWRANK_DEFAULTS, **lowrank}
        self.auto_refresh = auto_refresh
        self._stand_ins: dict[torch.Tensor, torch.Tensor] = {}
        self._base: torch.optim.Optimizer | None = None
        self._selectors: dict[tuple[Any, ...], SubspaceSelector] = {}
        # Per-layer updates (lowrank.per_layer): the active updater, whether the base groups were synced this step,
        # and where each tensor sits: param -> (group index, index in group), for our groups and the base's.
        self.per_layer: Any = None
        self._synced_this_step = False
        self._where: dict[torch.Tensor, tuple[int, int]] = {}
        self._base_where: dict[torch.Tensor, tuple[int, int]] = {}
        super().__init__(params, defaults)
        self._base = self.spec.factory(self._base_groups(self.param_groups), **self._base_options)

    # ----------------------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        if "param_names" not in param_group and not any(isinstance(p, tuple) for p in params):
            index = len(self.param_groups)
            param_group["param_names"] = [f"group{index}.param{i}" for i in range(len(params))]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        if group["rank"] is not None:
            group.setdefault("lowrank_step", 0)
            for param in group["params"]:
                side = _side(group, param)
                shape = projected_shape(param.shape, side, group["rank"])
                # Workspace the base steps on: zero before each step, the base's update of R after it. For an FSDP2
                # weight a DTensor (m, r) sharded like it, so that the base's moments are sharded too.
                if is_dtensor(param):
                    self._stand_ins[param] = sharded_zeros_like_rows(param, group["rank"])
                else:
                    self._stand_ins[param] = torch.zeros(shape, dtype=param.dtype, device=param.device)
        if self._base is not None:
            for base_group in self._base_groups([group]):
                self._base.add_param_group(base_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check(group["lr"] >= 0, "lr", group["lr"], "a number >= 0")
        _check(group["weight_decay"] >= 0, "weight_decay", group["weight_decay"], "a number >= 0")
        if "betas" in group:
            betas = tuple(group["betas"])
            _check(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "betas", betas, "two numbers in [0, 1)")
        if group["rank"] is None:
            return
        _check(group["selector"] in SELECTORS, "selector", group["selector"], ", ".join(sorted(SELECTORS)))
        _check(group["side"] in SIDES, "side", group["side"], ", ".join(SIDES))
        policy = group["moment_policy"]
        _check(policy in MOMENT_POLICIES, "moment_policy", policy, ", ".join(MOMENT_POLICIES))
        if policy == "rotate" and not self.spec.rotatable:
            raise ValueError(
                f"moment_policy: 'rotate' needs a base with known moments (adam, adamw); base {self.spec.name!r} "
                "accepts: keep, reset"
            )
        _check(group["alpha"] > 0, "alpha", group["alpha"], "a number > 0")
        _check(_is_int(group["update_gap"], 1), "update_gap", group["update_gap"], "an integer >= 1")
        _check(group["fira_gamma"] > 1, "fira_gamma", group["fira_gamma"], "a number > 1")
        _check(_is_int(group["oversampling"], 0), "oversampling", group["oversampling"], "an integer >= 0")
        _check(_is_int(group["power_iters"], 0), "power_iters", group["power_iters"], "an integer >= 0")
        rank = group["rank"]
        _check(_is_int(rank, 1), "rank", rank, "an integer >= 1")
        for name, param in zip(group["param_names"], group["params"]):
            if param.dim() != 2:
                raise ValueError(f"rank: parameter {name!r} has shape {tuple(param.shape)}; low-rank needs a 2-D weight")
            if rank > min(param.shape):
                raise ValueError(
                    f"rank: {rank} is larger than parameter {name!r} allows (shape {tuple(param.shape)}); "
                    f"accepted: 1 .. {min(param.shape)}"
                )
            if is_dtensor(param):
                check_row_sharded(param, name)
                if group["side"] == "left":
                    raise ValueError(
                        f"side: 'left' is not supported for the DTensor (FSDP2) parameter {name!r}; accepted: right, "
                        "auto (which means right for DTensors: row-sharded weights project locally on the right)"
                    )

    def _base_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The base's view of ``groups``: stand-ins replace low-rank parameters, in the same order."""
        out = []
        for group in groups:
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

    def _selector(self, group: dict[str, Any], name: str | None = None) -> SubspaceSelector:
        key = (name or group["selector"], group["oversampling"], group["power_iters"])
        if key not in self._selectors:
            self._selectors[key] = make_selector(key[0], oversampling=key[1], power_iters=key[2])
        return self._selectors[key]

    # ------------------------------------------------------------------------------------------------ refresh
    def _lowrank_params(self) -> Iterable[tuple[dict[str, Any], str, torch.Tensor]]:
        for group in self.param_groups:
            if group["rank"] is not None:
                yield from ((group, name, p) for name, p in zip(group["param_names"], group["params"]))

    @torch.no_grad()
    def resample(
        self,
        step: int | None = None,
        params: Iterable[torch.Tensor | str] | None = None,
        selector: str | None = None,
        split_across_ranks: bool = False,
    ) -> list[RefreshRecord]:
        """Refreshes the bases of low-rank parameters from their current gradients.

        Args:
            step: the optimizer step the refresh belongs to (seeds the draws); default: each group's
                ``lowrank_step``, the number of steps taken so far.
            params: parameters (tensors or names) to refresh; default all low-rank parameters with a gradient.
            selector: a rule name overriding the groups' ``selector`` for this refresh (e.g. GoLore's switch).
            split_across_ranks: DDP (plain tensors, identical gradients on every rank of the default process
                group): each rank computes a round-robin share of the new bases and broadcasts them
                (:mod:`lowrank.split_refresh`); a collective, so every rank must call it with the same arguments. No
                effect without an initialised process group of several ranks; refused for DTensor (FSDP2) parameters,
                whose bases every rank computes from the gathered gradient.

        Returns:
            One record per refreshed parameter (old and new basis, overlap). Parameters without a gradient, or with
            an all-zero or non-finite one (a warning names them; the old basis is kept), are not refreshed.
        """
        if self.per_layer is not None:
            raise RuntimeError(
                "lowrank: resample() cannot run with per-layer updates: the gradients are freed inside backward; the "
                "optimizer refreshes each basis itself inside backward every update_gap steps (auto_refresh)"
            )
        if selector is not None:
            _check(selector in SELECTORS, "selector", selector, ", ".join(sorted(SELECTORS)))
        wanted = None if params is None else {p if isinstance(p, str) else id(p) for p in params}
        todo = [(group, name, param, group["lowrank_step"] if step is None else step)
                for group, name, param in self._lowrank_params()
                if wanted is None or name in wanted or id(param) in wanted]
        if split_across_ranks and world()[1] > 1:
            return self._resample_split([entry for entry in todo if entry[2].grad is not None], selector)
        records = [self._refresh(group, name, param, at, selector) for group, name, param, at in todo]
        return [record for record in records if record is not None]

    def _resample_split(
        self, todo: list[tuple[dict[str, Any], str, torch.Tensor, int]], selector_name: str | None
    ) -> list[RefreshRecord]:
        """``resample(split_across_ranks=True)`` on several ranks: the selections run in ``run_split``, then every
        rank installs every basis (moment policy, state, record) as an unsplit refresh does."""
        jobs, rules = [], []
        for group, name, param, step in todo:
            if is_dtensor(param):
                raise ValueError(f"split_across_ranks: parameter {name!r} is a DTensor (FSDP2), whose basis every rank "
                                 "computes from the gathered gradient; accepted with DTensors: False")
            rule, oriented, select = self._selection(group, name, param, step, selector_name)
            dtype = torch.promote_types(oriented.dtype, torch.float32)  # holds the selector's fp32 (or wider) output
            jobs.append(SplitJob(select, (oriented.shape[0], group["rank"]), oriented.device, dtype))
            rules.append(rule)
        bases = run_split(jobs)
        records = [self._install(group, name, param, step, rule, basis)
                   for (group, name, param, step), rule, basis in zip(todo, rules, bases)]
        return [record for record in records if record is not None]

    def _refresh(
        self, group: dict[str, Any], name: str, param: torch.Tensor, step: int, selector_name: str | None
    ) -> RefreshRecord | None:
        if param.grad is None:
            return None
        rule, _, select = self._selection(group, name, param, step, selector_name)
        return self._install(group, name, param, step, rule, select())

    def _selection(
        self, group: dict[str, Any], name: str, param: torch.Tensor, step: int, selector_name: str | None
    ) -> tuple[str, torch.Tensor, Callable[[], torch.Tensor | None]]:
        """(rule name, oriented gradient (d, k), the draw of the new basis, not yet run) for one parameter: the full
        gradient (FSDP2: gathered, on refresh steps only, so every rank draws the same basis) oriented by the side
        rule, and the generator of (seed, step, name)."""
        selector = self._selector(group, selector_name)
        generator = draw_generator(group["seed"], step, name)
        oriented = orient(gather_full(param.grad), _side(group, param))
        return selector.name, oriented, functools.partial(selector.select, oriented, group["rank"], generator)

    def _install(
        self, group: dict[str, Any], name: str, param: torch.Tensor, step: int, selector_name: str,
        new_basis: torch.Tensor | None,
    ) -> RefreshRecord | None:
        """Makes ``new_basis`` (None: no refresh, keep the old basis or create a placeholder) the parameter's basis,
        applying the moment policy; the refresh's record, or None when nothing was refreshed."""
        state = self.state[param]
        side = _side(group, param)
        old_basis = state.get("lowrank_basis")
        if new_basis is None:
            what = "the old basis is kept" if old_basis is not None else "a placeholder basis (first axes) is used"
            # torch.distributed.checkpoint creates a fresh optimizer's state with one lr-0 step on zero gradients
            # (every resume of a sharded checkpoint): its placeholders are expected, so that case stays silent.
            if old_basis is not None or float(group["lr"]) != 0.0:
                warnings.warn(f"lowrank: gradient of {name!r} is all zero or non-finite at step {step}: {what}",
                              stacklevel=4)
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
                group["moment_policy"], base_state, old_basis, new_basis, side,
                self.spec.first_moment_keys, self.spec.second_moment_keys,
            )
        state["lowrank_basis"] = new_basis
        old_basis = None if old_basis is None else local(old_basis)  # records hold plain (replicated) tensors
        return RefreshRecord(name, step, selector_name, side, old_basis, local(new_basis))

    # --------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step (module docstring). The closure, if any, runs before any gradient is read."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_base_groups()
        active = []  # (group, param, stand-in, basis, side)
        for group, name, param in self._lowrank_params():
            if param.grad is None:
                self._stand_ins[param].grad = None
                continue
            active.append(self._project_grad(group, name, param, zero=False))
        # The base's update lands in zeroed stand-ins: one foreach call zeroes them all (one zero_ per weight cost a
        # GPU step of the 60m shapes about 10%: bench/optimizer_step.py).
        if active:
            torch._foreach_zero_([local(entry[2]) for entry in active])
        self._base.step()
        for entry in active:
            self._apply_update(*entry)
            entry[2].grad = None
        for group in self.param_groups:
            if group["rank"] is not None:
                group["lowrank_step"] += 1
        self._synced_this_step = False
        return loss

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Updates one parameter from its current gradient as :meth:`step` would (refresh when due, base step,
        update), without advancing any step counter: the :meth:`step` after the backward finishes the optimizer step
        (it only advances the counters, the gradients being gone). Per-layer updates (:mod:`lowrank.per_layer`) call
        it inside backward, one parameter at a time; the caller frees the gradient afterwards."""
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
        entry = self._project_grad(group, group["param_names"][pi], param)
        self._base_step_on(entry[2])
        self._apply_update(*entry)
        entry[2].grad = None

    def _project_grad(
        self, group: dict[str, Any], name: str, param: torch.Tensor, zero: bool = True
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """Refreshes the basis when due, then sets the projected gradient as the stand-in's grad and, with ``zero``,
        the stand-in to zero (``step`` zeroes all stand-ins at once instead)."""
        stand_in = self._stand_ins[param]
        due = self.auto_refresh and group["lowrank_step"] % group["update_gap"] == 0
        if due or "lowrank_basis" not in self.state[param]:
            self._refresh(group, name, param, group["lowrank_step"], None)
        basis = self.state[param]["lowrank_basis"]
        side = _side(group, param)
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
        base = self._base.state_dict()["state"]  # same parameter order, stand-ins in place of low-rank weights
        merged = {}
        for index in sorted(set(outer["state"]) | set(base)):
            merged[index] = {**base.get(index, {}), **outer["state"].get(index, {})}
        return {"state": merged, "param_groups": outer["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        for group, kept in zip(self.param_groups, storage):
            group.update(kept)
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


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
