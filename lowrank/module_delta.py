"""How far training moved each weight: the per-module weight-change diagnostics ("Delta" in the SfN study of which
modules a training method changes, arXiv 2505.20993). Pure PyTorch; ``lowrank_recipes.callbacks.ModuleDeltaMonitor``
logs them during a Lightning run, and :func:`module_deltas` compares two state dicts anywhere else.

For a parameter ("module") with reference weights W_ref (state A, e.g. the start of training) and current weights W
(state B), both of shape S with N = prod(S) elements:

* ``l2 = ||W - W_ref||_F`` and ``ref_l2 = ||W_ref||_F``, both in float64; ``relative_l2 = l2 / ref_l2``
  (``l2 == 0`` gives 0 whatever ``ref_l2`` is: an unchanged weight moved by nothing; ``l2 > 0`` with ``ref_l2 == 0``
  gives ``inf``). Over *every* element: a NaN or inf in W (a diverged step) or in W_ref makes ``l2`` (and
  ``relative_l2``; ``ref_l2`` for one in W_ref) NaN or inf, so that a broken weight shows as such and is never hidden.
* the element-wise relative change ``r = (w - w_ref) / w_ref`` over the *included* elements, those with
  ``|w_ref| >= threshold`` (:class:`DeltaOptions`) and a finite r. The others are *excluded* (and counted):
  r is undefined at ``w_ref = 0`` and meaningless near it (any change of a weight that starts at ~0 is an enormous
  relative change), so they would only add a spike of huge values; and an element whose r is not finite (a NaN or inf
  in w or w_ref; r of finite weights, computed in float64, is finite for any sensible threshold) has no place in a sum
  or a bin (a NaN would land in bin 0 and read as a -100% change). Such elements still enter ``l2`` (above).
* of r: the raw power sums ``sums = (sum r, sum r^2, sum r^3, sum r^4)`` (float64, r *unclipped*) and a histogram of
  ``clip(r, -1, 1)`` in ``bins`` equal bins over [-1, 1] (int64 counts; clipping only affects the histogram: the mass
  beyond +-100% change lands in the outer bins). Bin i holds ``-1 + 2 i / bins <= r < -1 + 2 (i + 1) / bins`` (the last
  bin also holds r = 1), up to float64 rounding at the edges: an unchanged element (r = 0) lands in bin ``bins // 2``
  (the centre bin for an odd ``bins``; for an even ``bins`` 0 is the edge and bin ``bins // 2`` is the one right of it).

From the power sums (n = included elements), the mean m = S1/n and the biased central moments
``m2 = S2/n - m^2``, ``m3 = S3/n - 3 m S2/n + 2 m^3``, ``m4 = S4/n - 4 m S3/n + 6 m^2 S2/n - 3 m^4``; the bias-corrected
(adjusted Fisher-Pearson) sample skewness and excess kurtosis

    g = sqrt(n (n - 1)) / (n - 2) * m3 / m2^(3/2)
    k = (n - 1) / ((n - 2) (n - 3)) * ((n + 1) (m4 / m2^2 - 3) + 6)

and Sarle's sample bimodality coefficient (:func:`bimodality_coefficient`)

    b = (g^2 + 1) / (k + 3 (n - 1)^2 / ((n - 2) (n - 3)))

in (0, 1]; b > 5/9 (~0.555, the value of a uniform distribution) suggests a bimodal (or very skewed) distribution, a
normal one gives ~1/3. It is ``nan`` for n < 4 and when the variance is 0 (within float64 rounding of the raw sums:
``m2 <= 1e-12 * S2 / n``; raw sums lose about ``(mean / std)^4`` ulps in m4, harmless for r whose mean is ~0 next to
its spread). In the SfN study the attention output projection (``o_proj``) changes most and is the only module type
whose r is bimodal.

Everything above is additive over elements, which is what makes it combinable: the delta of a module type (or of a
layer, or of a whole model) is :func:`combine` of its parameters' deltas (add ``l2^2``, ``ref_l2^2``, the counts, the
power sums and the histograms; take the square roots), and so is the delta of a parameter sharded over ranks
(FSDP2: each rank calls :func:`parameter_delta` on its local shard ``param.to_local()`` and its own shard of the
reference; :func:`merge_shards` adds them up, or :func:`pack_deltas` + ``all_reduce(SUM)`` + :func:`unpack_deltas` do
it across processes, see ``ModuleDeltaMonitor``). :func:`by_module_type` aggregates per module type and adds each
type's *share* of the total squared change, ``sum over its weights of l2^2 / sum over all weights of l2^2`` (NaN for
every type when that total is not finite: a NaN or inf weight somewhere leaves no share defined).

Module types and layers are the project's one naming rule, :func:`lowrank.names.module_types` (over the compared
names) and :func:`lowrank.names.layer_label`.

Memory: one parameter at a time, in chunks of ``CHUNK`` elements converted to float64 on the current tensor's device
(a few float64 chunk-sized temporaries, 32 MiB each); never a float64 copy of a whole model. Results are Python
floats and CPU int64 histograms. Example::

    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ...  # train
    deltas = module_deltas(model.state_dict(), reference, names=[n for n, p in model.named_parameters() if p.ndim >= 2])
    for kind, t in by_module_type(deltas).items():
        print(kind, t.relative_l2, t.share, t.bimodality)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lowrank.checks import check, dotted, is_int, is_number, raise_problems
from lowrank.names import layer_label, module_types

__all__ = [
    "CHUNK",
    "STATS",
    "DeltaOptions",
    "ParameterDelta",
    "TypeDelta",
    "bimodality_coefficient",
    "bin_edges",
    "by_layer_and_module_type",
    "by_module_type",
    "combine",
    "delta_option_problems",
    "empty_delta",
    "merge_shards",
    "module_deltas",
    "pack_deltas",
    "parameter_delta",
    "squared_change_shares",
    "unpack_deltas",
]

CHUNK = 1 << 22  # elements per float64 chunk (32 MiB per temporary)
# Columns of pack_deltas's float64 (P, 8) tensor: everything of a delta that adds up over shards, except the histogram.
STATS = ("l2_squared", "ref_l2_squared", "included", "excluded", "sum_r", "sum_r2", "sum_r3", "sum_r4")
_ZERO_VARIANCE = 1e-12  # m2 <= this * S2 / n counts as zero variance (rounding of the raw sums)


@dataclasses.dataclass(frozen=True)
class DeltaOptions:
    """How r is formed and binned (module docstring).

    Attributes:
        threshold: elements with ``|w_ref| < threshold`` are excluded from r (and counted as excluded, with those
            whose r is not finite); > 0.
        bins: histogram bins over [-1, 1] (r clipped to [-1, 1] for the histogram only); >= 1.

    Raises:
        ValueError: naming the invalid key(s) and the accepted values.
    """

    threshold: float = 1e-6
    bins: int = 50

    def __post_init__(self) -> None:
        raise_problems("invalid delta options", self.problems())

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid value, each named ``prefix.<field>``."""
        return delta_option_problems(self.threshold, self.bins, prefix)


def delta_option_problems(threshold: object, bins: object, prefix: str = "") -> list[str]:
    """The problems of :class:`DeltaOptions` values before building one (each named ``prefix.<field>``)."""
    return [
        *check(is_number(threshold) and threshold > 0, dotted(prefix, "threshold"), threshold, "a finite number > 0"),
        *check(is_int(bins, 1), dotted(prefix, "bins"), bins, "an integer >= 1"),
    ]


def _ratio(num: float, den: float) -> float:
    """num / den for non-negative norms: 0 when num is 0, inf when only den is."""
    if num == 0.0:
        return 0.0
    return num / den if den > 0.0 else math.inf


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclasses.dataclass(kw_only=True)
class Change:
    """The statistics of a change W_ref -> W over some elements, and what follows from them; the base of
    :class:`ParameterDelta` (one parameter or shard) and :class:`TypeDelta` (every parameter of a module type).

    Attributes:
        l2: ``||W - W_ref||_F`` (float64) over every element: NaN or inf when W or W_ref holds a NaN or inf.
        ref_l2: ``||W_ref||_F`` (likewise).
        included: elements with ``|w_ref| >= threshold`` and a finite r.
        excluded: the others: ``|w_ref| < threshold`` or r not finite (a NaN or inf in w or w_ref).
        sums: (sum r, sum r^2, sum r^3, sum r^4) over the included elements, r unclipped, float64.
        histogram: (bins,) int64 CPU counts of ``clip(r, -1, 1)`` over the included elements.
    """

    l2: float
    ref_l2: float
    included: int
    excluded: int
    sums: tuple[float, float, float, float]
    histogram: Tensor  # (bins,) int64, CPU

    @property
    def relative_l2(self) -> float:
        """``l2 / ref_l2``; 0 when ``l2`` is 0 (whatever ``ref_l2``), ``inf`` when only ``ref_l2`` is 0."""
        return _ratio(self.l2, self.ref_l2)

    @property
    def numel(self) -> int:
        return self.included + self.excluded

    @property
    def excluded_fraction(self) -> float:
        """``excluded / (included + excluded)``; 0 for no elements."""
        return _fraction(self.excluded, self.numel)

    @property
    def bimodality(self) -> float:
        """Sarle's coefficient of r over the included elements (:func:`bimodality_coefficient`)."""
        return bimodality_coefficient(self.included, self.sums)


@dataclasses.dataclass(kw_only=True)
class ParameterDelta(Change):
    """The change of one parameter (or, from :func:`combine`, of several; or of one rank's shard of one); the
    statistics are :class:`Change`'s.

    Attributes:
        name: the parameter name as given (a combination keeps it where every part has the same, else "").
        layer: :func:`lowrank.names.layer_label` of the name (likewise).
        module_type: :func:`lowrank.names.module_types` label among the names compared (likewise).
    """

    name: str
    layer: str
    module_type: str


@dataclasses.dataclass(kw_only=True)
class TypeDelta(Change):
    """The change of every weight of one module type (:func:`by_module_type`): :class:`Change`'s statistics summed
    over them (l2 and ref_l2 as ``sqrt`` of the summed squares).

    Attributes:
        module_type: the type's label.
        parameters: how many parameters (deltas) it combines.
        share: this type's sum of l2^2 over the sum of l2^2 of every type (the share of the total squared change;
            the shares of all types add up to 1, are all 0 when nothing changed, and all NaN when the total is not
            finite).
    """

    module_type: str
    parameters: int
    share: float


def bin_edges(bins: int) -> Tensor:
    """(bins + 1,) float64 edges of the histogram over [-1, 1]."""
    return torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64)


def empty_delta(name: str, bins: int, module_type: str = "", layer: str = "") -> ParameterDelta:
    """The delta of no elements (a rank that holds no part of a parameter): zeros everywhere."""
    return ParameterDelta(
        name=name,
        layer=layer or layer_label(name),
        module_type=module_type,
        l2=0.0,
        ref_l2=0.0,
        included=0,
        excluded=0,
        sums=(0.0, 0.0, 0.0, 0.0),
        histogram=torch.zeros(bins, dtype=torch.int64),
    )


def parameter_delta(
    name: str,
    current: Tensor,
    reference: Tensor,
    options: DeltaOptions = DeltaOptions(),
    module_type: str = "",
    layer: str = "",
) -> ParameterDelta:
    """The :class:`ParameterDelta` of one parameter (module docstring).

    Args:
        name: the parameter's name (kept as is; the layer label and default module type come from it).
        current: W, shape S, any floating dtype, any device (the computation runs there). Plain tensors only: pass a
            DTensor's local shard (``param.to_local()``) with the matching shard of the reference.
        reference: W_ref, shape S, any floating dtype and device (moved chunk by chunk to ``current``'s device).
        options: threshold and bins.
        module_type: the type label (default: the leaf module of ``name``, :func:`lowrank.names.module_types` of
            ``[name]``); :func:`module_deltas` passes the label among every compared name.
        layer: the layer label (default: :func:`lowrank.names.layer_label` of ``name``).

    Non-finite values: an element whose r is not finite (a NaN or inf in ``current`` or ``reference``) is excluded
    from r, like ``|w_ref| < threshold``; ``l2`` (and ``ref_l2``) still take every element, so they are NaN or inf.

    Raises:
        ValueError: when the shapes differ (naming the parameter and both shapes) or a tensor is not floating point.
    """
    if tuple(current.shape) != tuple(reference.shape):
        raise ValueError(
            f"parameter {name!r}: shape mismatch: current {tuple(current.shape)}, reference {tuple(reference.shape)}"
        )
    for side, tensor in (("current", current), ("reference", reference)):
        if not tensor.is_floating_point():
            raise ValueError(f"parameter {name!r}: {side} has dtype {tensor.dtype}; accepted: floating-point tensors")
    device, bins, threshold = current.device, options.bins, float(options.threshold)
    flat = current.detach().reshape(-1)  # (N,)
    flat_ref = reference.detach().reshape(-1)  # (N,)
    numel = flat.numel()
    totals = torch.zeros(6, dtype=torch.float64, device=device)  # l2^2, ref_l2^2, S1..S4
    histogram = torch.zeros(bins, dtype=torch.int64, device=device)  # (bins,)
    included = 0
    for start in range(0, numel, CHUNK):
        w = flat[start : start + CHUNK].to(torch.float64)  # (c,)
        w_ref = flat_ref[start : start + CHUNK].to(device=device, dtype=torch.float64)  # (c,)
        diff = w - w_ref  # (c,)
        keep = w_ref.abs() >= threshold  # (c,) bool; False for a NaN w_ref
        r = diff[keep] / w_ref[keep]  # (c_kept,)
        r = r[torch.isfinite(r)]  # (c_included,): a NaN or inf in w or w_ref is excluded, never binned
        included += r.numel()
        r2 = r * r
        totals += torch.stack(
            [
                diff.square().sum(),  # every element: NaN / inf stay visible in l2
                w_ref.square().sum(),
                r.sum(),
                r2.sum(),
                (r2 * r).sum(),
                (r2 * r2).sum(),
            ]
        )
        index = ((r.clamp(-1.0, 1.0) + 1.0) * (bins / 2.0)).floor().to(torch.int64).clamp_(0, bins - 1)  # (c_included,)
        histogram += torch.bincount(index, minlength=bins)
    l2_sq, ref_sq, s1, s2, s3, s4 = totals.tolist()
    return ParameterDelta(
        name=name,
        layer=layer or layer_label(name),
        module_type=module_type or module_types([name])[name],
        l2=math.sqrt(l2_sq),
        ref_l2=math.sqrt(ref_sq),
        included=included,
        excluded=numel - included,
        sums=(s1, s2, s3, s4),
        histogram=histogram.cpu(),
    )


def module_deltas(
    current: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    options: DeltaOptions = DeltaOptions(),
    names: Iterable[str] | None = None,
) -> list[ParameterDelta]:
    """The delta of every compared parameter, one at a time, in the order of ``names``.

    Args:
        current: name -> W (a state dict: ``model.state_dict()``, or loaded from a checkpoint).
        reference: name -> W_ref.
        options: threshold and bins.
        names: the keys to compare; default: every floating-point key of ``reference`` (buffers included if the
            mapping holds them: pass the weights' names to restrict, e.g. ``p.ndim >= 2`` of ``named_parameters``).

    Returns:
        One :class:`ParameterDelta` per name, module types by :func:`lowrank.names.module_types` over the names.

    Raises:
        ValueError: naming every key missing from either side, every shape mismatch (with both shapes) and every
            non-floating-point key, all at once.
    """
    chosen = [k for k, v in reference.items() if v.is_floating_point()] if names is None else list(names)
    problems = []
    for name in chosen:
        missing = [side for side, mapping in (("current", current), ("reference", reference)) if name not in mapping]
        if missing:
            problems.append(f"{name!r}: missing from {' and '.join(missing)}")
        elif tuple(current[name].shape) != tuple(reference[name].shape):
            problems.append(
                f"{name!r}: shape mismatch: current {tuple(current[name].shape)}, "
                f"reference {tuple(reference[name].shape)}"
            )
        elif not (current[name].is_floating_point() and reference[name].is_floating_point()):
            problems.append(
                f"{name!r}: dtypes {current[name].dtype} / {reference[name].dtype}; accepted: floating-point tensors"
            )
    raise_problems("module_deltas: cannot compare", problems)
    types = module_types(chosen)
    return [parameter_delta(n, current[n], reference[n], options, types[n], layer_label(n)) for n in chosen]


def bimodality_coefficient(count: int, sums: tuple[float, float, float, float]) -> float:
    """Sarle's sample bimodality coefficient of n = ``count`` values with raw power sums ``sums`` = (S1, S2, S3, S4)
    (module docstring: bias-corrected skewness g and excess kurtosis k, b = (g^2 + 1) / (k + 3 (n-1)^2 / ((n-2)(n-3)))).

    Computed from the raw sums, so that shards and modules combine by adding them. ``nan`` when n < 4 or the variance
    is 0; > 5/9 suggests bimodality.
    """
    n = float(count)
    if count < 4:
        return math.nan
    s1, s2, s3, s4 = (float(s) for s in sums)
    m = s1 / n
    e2, e3, e4 = s2 / n, s3 / n, s4 / n  # raw moments
    m2 = e2 - m * m
    if not m2 > _ZERO_VARIANCE * e2:  # also catches nan
        return math.nan
    m3 = e3 - 3.0 * m * e2 + 2.0 * m**3
    m4 = e4 - 4.0 * m * e3 + 6.0 * m * m * e2 - 3.0 * m**4
    skew = math.sqrt(n * (n - 1.0)) / (n - 2.0) * m3 / m2**1.5
    excess = (n - 1.0) / ((n - 2.0) * (n - 3.0)) * ((n + 1.0) * (m4 / (m2 * m2) - 3.0) + 6.0)
    return (skew * skew + 1.0) / (excess + 3.0 * (n - 1.0) ** 2 / ((n - 2.0) * (n - 3.0)))


def _common(values: Iterable[str]) -> str:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else ""


def combine(deltas: Iterable[ParameterDelta]) -> ParameterDelta:
    """One :class:`ParameterDelta` for the union of the elements of ``deltas`` (parameters of a module type or a layer,
    or shards of one parameter): ``l2 = sqrt(sum l2^2)``, ``ref_l2`` likewise, counts, power sums and histograms added.
    ``name``, ``layer`` and ``module_type`` are kept where every part has the same value, else "".

    Raises:
        ValueError: for no deltas, or histograms of different bin counts.
    """
    parts = list(deltas)
    if not parts:
        raise ValueError("combine: no deltas to combine; accepted: one or more ParameterDelta")
    bins = {part.histogram.numel() for part in parts}
    if len(bins) != 1:
        raise ValueError(f"combine: histograms of different bin counts {sorted(bins)}; accepted: equal bins")
    return ParameterDelta(
        name=_common(p.name for p in parts),
        layer=_common(p.layer for p in parts),
        module_type=_common(p.module_type for p in parts),
        l2=math.sqrt(sum(p.l2 * p.l2 for p in parts)),
        ref_l2=math.sqrt(sum(p.ref_l2 * p.ref_l2 for p in parts)),
        included=sum(p.included for p in parts),
        excluded=sum(p.excluded for p in parts),
        sums=tuple(math.fsum(p.sums[i] for p in parts) for i in range(4)),  # type: ignore[arg-type]
        histogram=torch.stack([p.histogram for p in parts]).sum(dim=0),
    )


def merge_shards(shards: Iterable[ParameterDelta]) -> ParameterDelta:
    """The delta of a whole parameter from the deltas of its shards (each rank's :func:`parameter_delta` of its local
    shard, e.g. gathered with ``all_gather_object``): :func:`combine`, checked to be one parameter.

    Raises:
        ValueError: when the shards name different parameters (naming them), or as :func:`combine`.
    """
    parts = list(shards)
    names = sorted({part.name for part in parts})
    if len(names) > 1:
        raise ValueError(f"merge_shards: shards of different parameters {names}; accepted: shards of one parameter")
    return combine(parts)


def by_layer_and_module_type(deltas: Iterable[ParameterDelta]) -> dict[tuple[str, str], ParameterDelta]:
    """(layer, module type) -> :func:`combine` of the deltas of that layer and type, in order of first appearance."""
    groups: dict[tuple[str, str], list[ParameterDelta]] = {}
    for delta in deltas:
        groups.setdefault((delta.layer, delta.module_type), []).append(delta)
    return {key: combine(parts) for key, parts in groups.items()}


def by_module_type(deltas: Iterable[ParameterDelta]) -> dict[str, TypeDelta]:
    """Module type -> :class:`TypeDelta` (combined over the type's parameters, with its share of the total squared
    change: all 0 when nothing changed, all NaN when the total is not finite), in order of first appearance."""
    groups: dict[str, list[ParameterDelta]] = {}
    for delta in deltas:
        groups.setdefault(delta.module_type, []).append(delta)
    combined = {kind: combine(parts) for kind, parts in groups.items()}
    total = math.fsum(c.l2 * c.l2 for c in combined.values())  # NaN or inf when some l2 is
    return {
        kind: TypeDelta(
            module_type=kind,
            parameters=len(groups[kind]),
            l2=c.l2,
            ref_l2=c.ref_l2,
            included=c.included,
            excluded=c.excluded,
            sums=c.sums,
            histogram=c.histogram,
            share=_share(c.l2 * c.l2, total),
        )
        for kind, c in combined.items()
    }


def _share(part: float, total: float) -> float:
    """part / total of squared changes: 0 when nothing changed, NaN when the total is not finite."""
    if not math.isfinite(total):
        return math.nan
    return part / total if total > 0 else 0.0


def squared_change_shares(deltas: Iterable[ParameterDelta]) -> dict[str, float]:
    """Module type -> its share of the total squared change (adds up to 1; all 0 when nothing changed; all NaN when
    the total is not finite)."""
    return {kind: t.share for kind, t in by_module_type(deltas).items()}


def pack_deltas(deltas: Iterable[ParameterDelta]) -> tuple[Tensor, Tensor]:
    """The additive part of P deltas as two tensors, for one ``all_reduce(SUM)`` each across ranks that hold shards:
    (P, 8) float64 with the columns :data:`STATS` (squared norms, counts, power sums) and (P, bins) int64 histograms.
    Counts travel as float64: exact up to 2^53 elements."""
    parts = list(deltas)
    if not parts:
        return torch.zeros(0, len(STATS), dtype=torch.float64), torch.zeros(0, 0, dtype=torch.int64)
    stats = torch.tensor(
        [[p.l2 * p.l2, p.ref_l2 * p.ref_l2, float(p.included), float(p.excluded), *p.sums] for p in parts],
        dtype=torch.float64,
    )  # (P, 8)
    return stats, torch.stack([p.histogram for p in parts])  # (P, 8), (P, bins)


def _root(square: float) -> float:
    """sqrt of a reduced sum of squares: NaN and inf kept (a non-finite weight), negative rounding read as 0."""
    return math.nan if math.isnan(square) else math.sqrt(max(square, 0.0))


def unpack_deltas(templates: Iterable[ParameterDelta], stats: Tensor, histograms: Tensor) -> list[ParameterDelta]:
    """The deltas of (reduced) :func:`pack_deltas` tensors, named like ``templates`` (the same P deltas, in order)."""
    parts = list(templates)
    if stats.shape[0] != len(parts) or histograms.shape[0] != len(parts):
        raise ValueError(
            f"unpack_deltas: {len(parts)} templates for stats {tuple(stats.shape)} and histograms "
            f"{tuple(histograms.shape)}; accepted: one row per template"
        )
    rows, counts = stats.cpu().tolist(), histograms.cpu()
    return [
        dataclasses.replace(
            part,
            l2=_root(row[0]),
            ref_l2=_root(row[1]),
            included=round(row[2]),
            excluded=round(row[3]),
            sums=(row[4], row[5], row[6], row[7]),
            histogram=counts[i].clone(),
        )
        for i, (part, row) in enumerate(zip(parts, rows))
    ]
