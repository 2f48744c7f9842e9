"""lowrank.module_delta against independent computations: norms and power sums by hand in Python floats, histogram
counts by explicit edge comparisons, the bimodality coefficient from k-statistics of explicit samples (and scipy where
installed), shards combined against the whole tensor, NaN / inf weights (excluded from r, visible in l2), and the
refusals."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank.module_delta import (
    DeltaOptions,
    bimodality_coefficient,
    by_layer_and_module_type,
    by_module_type,
    combine,
    merge_shards,
    module_deltas,
    pack_deltas,
    parameter_delta,
    squared_change_shares,
    unpack_deltas,
)

O_PROJ = "model.layers.2.self_attn.o_proj.weight"


def _pair(shape: tuple[int, ...], seed: int, scale: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(current, reference) float32 with a relative change of about ``scale``."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(shape, generator=g)
    return reference + scale * torch.randn(shape, generator=g), reference


def _by_hand(current: torch.Tensor, reference: torch.Tensor, threshold: float, bins: int) -> dict:
    """Every statistic with Python floats, element by element."""
    w, w0 = current.flatten().tolist(), reference.flatten().tolist()
    diff2 = math.fsum((a - b) ** 2 for a, b in zip(w, w0))
    ref2 = math.fsum(b * b for b in w0)
    r = [(a - b) / b for a, b in zip(w, w0) if abs(b) >= threshold]
    edges = [-1.0 + 2.0 * i / bins for i in range(bins + 1)]
    counts = [0] * bins
    for value in r:
        clipped = min(max(value, -1.0), 1.0)
        for i in range(bins):
            if edges[i] <= clipped < edges[i + 1] or (i == bins - 1 and clipped == 1.0):
                counts[i] += 1
                break
    return {
        "l2": math.sqrt(diff2),
        "ref_l2": math.sqrt(ref2),
        "included": len(r),
        "excluded": sum(1 for b in w0 if abs(b) < threshold),
        "sums": [math.fsum(x**k for x in r) for k in (1, 2, 3, 4)],
        "counts": counts,
    }


def _sarle_from_samples(x: list[float]) -> float:
    """Sarle's b from k-statistics (unbiased cumulants) of explicit samples, central moments in two passes."""
    n = len(x)
    mean = math.fsum(x) / n
    m2, m3, m4 = (math.fsum((v - mean) ** k for v in x) / n for k in (2, 3, 4))
    k2 = n * m2 / (n - 1)
    k3 = n * n * m3 / ((n - 1) * (n - 2))
    k4 = n * n * ((n + 1) * m4 - 3 * (n - 1) * m2 * m2) / ((n - 1) * (n - 2) * (n - 3))
    skew, excess = k3 / k2**1.5, k4 / (k2 * k2)
    return (skew**2 + 1) / (excess + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def _power_sums(x: list[float]) -> tuple[float, float, float, float]:
    return tuple(math.fsum(v**k for v in x) for k in (1, 2, 3, 4))  # type: ignore[return-value]


def test_norms_sums_counts_equal_a_computation_by_hand() -> None:
    current, reference = _pair((7, 5), seed=0, scale=0.3)
    reference[0, :3] = torch.tensor([0.0, 5e-4, -2e-4])  # below the threshold: excluded
    options = DeltaOptions(threshold=1e-3, bins=8)
    delta = parameter_delta(O_PROJ, current, reference, options)
    expected = _by_hand(current, reference, 1e-3, 8)
    assert delta.name == O_PROJ and delta.layer == "model.layers.2" and delta.module_type == "o_proj"
    assert delta.l2 == pytest.approx(expected["l2"], rel=1e-12)
    assert delta.ref_l2 == pytest.approx(expected["ref_l2"], rel=1e-12)
    assert delta.relative_l2 == pytest.approx(expected["l2"] / expected["ref_l2"], rel=1e-12)
    assert (delta.included, delta.excluded) == (expected["included"], expected["excluded"]) == (32, 3)
    assert delta.included + delta.excluded == current.numel()
    assert list(delta.sums) == pytest.approx(expected["sums"], rel=1e-10)
    assert delta.histogram.dtype == torch.int64 and delta.histogram.device.type == "cpu"
    assert delta.histogram.tolist() == expected["counts"]
    assert int(delta.histogram.sum()) == delta.included
    assert delta.excluded_fraction == pytest.approx(3 / 35)


def test_excluded_count_equals_an_independent_count() -> None:
    g = torch.Generator().manual_seed(5)
    reference = torch.randn(40, 30, generator=g) * 1e-3  # many elements near the threshold
    current = reference + 1e-4 * torch.randn(40, 30, generator=g)
    threshold = 5e-4
    delta = parameter_delta("w", current, reference, DeltaOptions(threshold=threshold))
    below = sum(1 for v in reference.flatten().tolist() if abs(v) < threshold)
    assert 0 < below < reference.numel()
    assert delta.excluded == below and delta.included == reference.numel() - below
    assert int(delta.histogram.sum()) == delta.included


def test_an_unchanged_parameter_has_zero_change_and_a_centre_bin_histogram() -> None:
    _, reference = _pair((6, 4), seed=1)
    for bins in (50, 51, 1):
        delta = parameter_delta("layers.0.mlp.up_proj.weight", reference.clone(), reference, DeltaOptions(bins=bins))
        assert delta.l2 == 0.0 and delta.relative_l2 == 0.0 and delta.sums == (0.0, 0.0, 0.0, 0.0)
        expected = torch.zeros(bins, dtype=torch.int64)
        expected[bins // 2] = reference.numel()
        assert torch.equal(delta.histogram, expected)
        assert math.isnan(delta.bimodality)  # no spread


def test_clipping_affects_the_histogram_only() -> None:
    reference = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    current = torch.tensor([[6.0, 2.0], [0.25, -1.5]], dtype=torch.float64)  # r = 5, 0, -0.5, 0.5
    delta = parameter_delta("w", current, reference, DeltaOptions(bins=4))
    r = [5.0, 0.0, -0.5, 0.5]
    assert list(delta.sums) == pytest.approx([sum(v**k for v in r) for k in (1, 2, 3, 4)], rel=1e-15)
    assert delta.sums[0] == pytest.approx(5.0) and delta.sums[3] == pytest.approx(625.0 + 2 * 0.0625)
    # bins [-1,-.5) [-.5,0) [0,.5) [.5,1]: r = 5 clipped to 1 (last bin), -0.5 in bin 1, 0 in bin 2, 0.5 in bin 3
    assert delta.histogram.tolist() == [0, 1, 1, 2]
    assert delta.l2 == pytest.approx(math.sqrt(25 + 0.0625 + 0.25))


def test_non_finite_values_are_excluded_from_r_and_shown_in_l2() -> None:
    reference = torch.ones(4, 5)
    changes = [0.05 * (i - 9) for i in range(20)]  # r in [-0.45, 0.5]: never in the outer bins
    current = torch.tensor([1.0 + c for c in changes], dtype=torch.float32).reshape(4, 5)
    current[1, 2], current[3, 0] = float("nan"), float("inf")
    bins = 10
    delta = parameter_delta(O_PROJ, current, reference, DeltaOptions(bins=bins))
    # by hand over the 18 finite elements: r = w - 1 (w_ref = 1), float32 values taken as Python floats
    r = [v - 1.0 for v in current.flatten().tolist() if math.isfinite(v)]
    assert len(r) == 18
    assert (delta.included, delta.excluded) == (18, 2)
    assert int(delta.histogram.sum()) == delta.included
    edges = [-1.0 + 2.0 * i / bins for i in range(bins + 1)]
    counts = [sum(1 for v in r if edges[i] <= v < edges[i + 1]) for i in range(bins)]
    assert delta.histogram.tolist() == counts and counts[0] == 0  # no NaN cast into bin 0 (a -100% change)
    assert all(math.isfinite(s) for s in delta.sums)
    assert list(delta.sums) == pytest.approx([math.fsum(v**k for v in r) for k in (1, 2, 3, 4)], rel=1e-12)
    assert math.isfinite(delta.bimodality)
    assert math.isnan(delta.l2) and math.isnan(delta.relative_l2) and delta.ref_l2 == math.sqrt(20.0)
    # inf alone: l2 inf; through combine, pack / unpack and the shares the broken value stays visible
    only_inf = torch.where(current.isnan(), torch.ones_like(current), current)
    broken = parameter_delta(O_PROJ, only_inf, reference, DeltaOptions(bins=bins))
    assert broken.l2 == math.inf and (broken.included, broken.excluded) == (19, 1)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    healthy = parameter_delta(q_proj, reference + 0.1, reference, DeltaOptions(bins=bins))
    assert combine([broken, healthy]).l2 == math.inf
    (unpacked,) = unpack_deltas([delta], *pack_deltas([delta]))
    assert math.isnan(unpacked.l2) and unpacked.included == 18
    shares = squared_change_shares([broken, healthy])
    assert list(shares) == ["o_proj", "q_proj"] and all(math.isnan(v) for v in shares.values())
    # a NaN or inf in the reference: excluded from r, shown in ref_l2
    bad_reference = reference.clone()
    bad_reference[0, 0], bad_reference[0, 1] = float("inf"), float("nan")
    moved = parameter_delta("w", reference + 0.25, bad_reference, DeltaOptions(bins=bins))
    assert (moved.included, moved.excluded) == (18, 2)
    assert moved.sums == pytest.approx((18 * 0.25, 18 * 0.25**2, 18 * 0.25**3, 18 * 0.25**4), rel=1e-12)
    assert math.isnan(moved.ref_l2) and math.isnan(moved.l2)


def test_relative_l2_when_the_reference_is_zero() -> None:
    zero = torch.zeros(3, 2)
    assert parameter_delta("w", zero, zero.clone()).relative_l2 == 0.0
    moved = parameter_delta("w", torch.ones(3, 2), zero)
    assert moved.relative_l2 == math.inf and moved.included == 0 and moved.excluded == 6
    assert int(moved.histogram.sum()) == 0


def test_a_large_parameter_is_chunked_like_a_small_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import lowrank.module_delta as module_delta

    current, reference = _pair((33, 17), seed=2, scale=0.5)
    whole = parameter_delta("w", current, reference)
    monkeypatch.setattr(module_delta, "CHUNK", 50)  # 12 chunks, the last one partial
    chunked = parameter_delta("w", current, reference)
    assert torch.equal(whole.histogram, chunked.histogram)
    assert (whole.included, whole.excluded) == (chunked.included, chunked.excluded)
    assert chunked.l2 == pytest.approx(whole.l2, rel=1e-13)
    assert list(chunked.sums) == pytest.approx(list(whole.sums), rel=1e-12)


def test_bimodality_against_k_statistics_of_explicit_samples() -> None:
    g = torch.Generator().manual_seed(3)
    normal = (torch.randn(4000, generator=g, dtype=torch.float64) * 0.1 + 0.02).tolist()
    # two separated clusters: +-0.3 with a small spread
    clusters = (torch.randn(4000, generator=g, dtype=torch.float64) * 0.03).tolist()
    bimodal = [v + (0.3 if i % 2 else -0.3) for i, v in enumerate(clusters)]
    skewed = (torch.rand(500, generator=g, dtype=torch.float64) ** 3).tolist()
    for sample in (normal, bimodal, skewed, [0.1, -0.2, 0.5, 0.05, 0.3]):
        assert bimodality_coefficient(len(sample), _power_sums(sample)) == pytest.approx(
            _sarle_from_samples(sample), rel=1e-9
        )
    assert bimodality_coefficient(len(bimodal), _power_sums(bimodal)) > 5 / 9 + 0.2  # ~0.9
    assert bimodality_coefficient(len(normal), _power_sums(normal)) < 5 / 9 - 0.15  # ~1/3
    assert math.isnan(bimodality_coefficient(3, _power_sums([0.1, 0.2, 0.3])))
    assert math.isnan(bimodality_coefficient(4, _power_sums([0.25] * 4)))  # no variance


def test_bimodality_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(4)
    sample = (torch.randn(300, generator=g, dtype=torch.float64) ** 2 - 0.5).tolist()
    skew, excess = stats.skew(sample, bias=False), stats.kurtosis(sample, bias=False, fisher=True)
    n = len(sample)
    expected = (skew**2 + 1) / (excess + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    assert bimodality_coefficient(n, _power_sums(sample)) == pytest.approx(expected, rel=1e-9)


def test_shards_combine_to_the_whole() -> None:
    current, reference = _pair((10, 6), seed=6, scale=0.4)
    options = DeltaOptions(threshold=0.05, bins=10)
    whole = parameter_delta(O_PROJ, current, reference, options)
    halves = [parameter_delta(O_PROJ, c, r, options) for c, r in zip(current.split(4), reference.split(4))]
    for merged in (merge_shards(halves), combine(halves)):
        assert merged.name == O_PROJ and merged.module_type == "o_proj" and merged.layer == "model.layers.2"
        assert merged.l2 == pytest.approx(whole.l2, rel=1e-12)
        assert merged.ref_l2 == pytest.approx(whole.ref_l2, rel=1e-12)
        assert (merged.included, merged.excluded) == (whole.included, whole.excluded)
        assert list(merged.sums) == pytest.approx(list(whole.sums), rel=1e-12)
        assert torch.equal(merged.histogram, whole.histogram)
        assert merged.bimodality == pytest.approx(whole.bimodality, rel=1e-9)
    # the same through pack / a sum (what all_reduce does) / unpack
    packed = [pack_deltas([half]) for half in halves]
    stats, histograms = sum(p[0] for p in packed), sum(p[1] for p in packed)
    (unpacked,) = unpack_deltas([halves[0]], stats, histograms)
    assert unpacked.l2 == pytest.approx(whole.l2, rel=1e-12) and torch.equal(unpacked.histogram, whole.histogram)
    assert (unpacked.included, unpacked.excluded) == (whole.included, whole.excluded)
    with pytest.raises(ValueError, match="shards of different parameters.*'a'.*'b'"):
        merge_shards([parameter_delta("a", current, reference), parameter_delta("b", current, reference)])
    with pytest.raises(ValueError, match="different bin counts"):
        combine([whole, parameter_delta(O_PROJ, current, reference, DeltaOptions(bins=4))])


def test_module_types_layers_and_shares() -> None:
    names = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "self_attn.o_proj")]
    names += ["model.layers.0.attn.c_proj.weight", "model.layers.0.mlp.c_proj.weight", "model.norm.weight"]
    reference, current = {}, {}
    for i, name in enumerate(names):
        current[name], reference[name] = _pair((4, 3), seed=10 + i, scale=0.05 * (i + 1))
    reference["model.layers.0.step"] = torch.tensor(3)  # not floating point: not compared by default
    deltas = module_deltas(current, reference, DeltaOptions(threshold=1e-3))
    assert [d.name for d in deltas] == names
    assert [d.module_type for d in deltas] == ["q_proj", "o_proj"] * 2 + ["attn.c_proj", "mlp.c_proj", "norm"]
    assert [d.layer for d in deltas] == ["model.layers.0"] * 2 + ["model.layers.1"] * 2 + ["model.layers.0"] * 2 + [
        "model"
    ]
    squared = {}
    for name in names:
        kind = next(d.module_type for d in deltas if d.name == name)
        squared.setdefault(kind, []).append(_by_hand(current[name], reference[name], 1e-3, 50))
    total = sum(e["l2"] ** 2 for parts in squared.values() for e in parts)
    types = by_module_type(deltas)
    assert list(types) == ["q_proj", "o_proj", "attn.c_proj", "mlp.c_proj", "norm"]
    for kind, parts in squared.items():
        l2 = math.sqrt(sum(e["l2"] ** 2 for e in parts))
        ref_l2 = math.sqrt(sum(e["ref_l2"] ** 2 for e in parts))
        assert types[kind].parameters == len(parts)
        assert types[kind].l2 == pytest.approx(l2, rel=1e-12)
        assert types[kind].relative_l2 == pytest.approx(l2 / ref_l2, rel=1e-12)
        assert types[kind].share == pytest.approx(l2**2 / total, rel=1e-12)
        assert types[kind].included == sum(e["included"] for e in parts)
        assert types[kind].histogram.tolist() == [sum(c) for c in zip(*(e["counts"] for e in parts))]
    assert sum(squared_change_shares(deltas).values()) == pytest.approx(1.0)
    cells = by_layer_and_module_type(deltas)
    assert set(cells) == {(d.layer, d.module_type) for d in deltas}
    assert cells[("model.layers.1", "o_proj")].l2 == pytest.approx(deltas[3].l2)
    # nothing changed anywhere: every share 0
    assert set(squared_change_shares(module_deltas(reference, reference)).values()) == {0.0}


def test_mismatched_names_and_shapes_are_refused_naming_the_keys() -> None:
    current = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4, 4)}
    reference = {"a.weight": torch.zeros(3, 2), "c.weight": torch.zeros(1)}
    with pytest.raises(ValueError) as caught:
        module_deltas(current, reference, names=["a.weight", "b.weight", "c.weight"])
    message = str(caught.value)
    assert "'a.weight': shape mismatch: current (2, 3), reference (3, 2)" in message
    assert "'b.weight': missing from reference" in message and "'c.weight': missing from current" in message
    with pytest.raises(ValueError, match=r"'a.weight': shape mismatch: current \(2, 3\), reference \(3, 2\)"):
        parameter_delta("a.weight", current["a.weight"], reference["a.weight"])
    with pytest.raises(ValueError, match="'n': .*accepted: floating-point"):
        module_deltas({"n": torch.zeros(2, dtype=torch.int64)}, {"n": torch.zeros(2, dtype=torch.int64)}, names=["n"])


@pytest.mark.parametrize(
    ("kwargs", "key", "accepted"),
    [
        ({"threshold": 0.0}, "threshold", "a finite number > 0"),
        ({"threshold": float("nan")}, "threshold", "a finite number > 0"),
        ({"threshold": "1e-6"}, "threshold", "a finite number > 0"),
        ({"bins": 0}, "bins", "an integer >= 1"),
        ({"bins": 2.0}, "bins", "an integer >= 1"),
        ({"bins": True}, "bins", "an integer >= 1"),
    ],
)
def test_invalid_options_name_the_key(kwargs: dict, key: str, accepted: str) -> None:
    with pytest.raises(ValueError, match=f"{key}: invalid value .*; accepted: {accepted}"):
        DeltaOptions(**kwargs)


def test_float64_accumulation_for_low_precision_weights() -> None:
    reference = torch.full((64, 64), 1.0, dtype=torch.bfloat16)
    current = reference + torch.full_like(reference, 2.0**-7)  # exactly representable in bf16
    delta = parameter_delta("w", current, reference)
    assert delta.l2 == 2.0**-7 * 64 and delta.ref_l2 == 64.0  # exact: no bf16 or float32 accumulation
    assert delta.sums == (4096 * 2.0**-7, 4096 * 2.0**-14, 4096 * 2.0**-21, 4096 * 2.0**-28)
