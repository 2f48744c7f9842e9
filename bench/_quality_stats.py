"""Statistics of ``bench/quality.py``: means, Student-t intervals, paired differences, fraction of the gap closed.

No scipy: the two-sided 95% Student-t quantiles t_{0.975, df} are hard-coded below (standard table values).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond 30 the normal 1.96 is within 2%.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


# t_{0.80, df} for df = 1..10 (one-sided 80%: the power term of a detectable difference); beyond 10 the normal 0.842.
_T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879)


def t80(df: int) -> float:
    """The 0.80 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"df: invalid value {df!r}; accepted: an integer >= 1")
    return _T80[df - 1] if df <= len(_T80) else 0.842


def detectable_difference(std: float, n: int) -> dict[str, float]:
    """What n paired seeds with per-seed differences of standard deviation ``std`` can resolve.

    ``excludes_zero``: t_{0.975, n-1} std / sqrt(n), the smallest mean difference whose 95% interval excludes zero
    (the interval's half-width); ``power80``: (t_{0.975, n-1} + t_{0.80, n-1}) std / sqrt(n), the true difference a
    two-sided 5% paired t-test finds with 80% probability (normal approximation with t quantiles, std taken as known).
    """
    if n < 2:
        raise ValueError(f"n: invalid value {n!r}; accepted: an integer >= 2 (a spread needs two seeds)")
    scale = std / math.sqrt(n)
    return {"excludes_zero": t975(n - 1) * scale, "power80": (t975(n - 1) + t80(n - 1)) * scale}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"df: invalid value {df!r}; accepted: an integer >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std and the 95% Student-t interval of the mean (None where n < 2)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(values)
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """a - b over the seeds both have (same seed: same init and data order, so the pairs share their noise);
    n, mean, std and 95% interval of the per-seed differences."""
    seeds = sorted(set(a) & set(b))
    result = summarize([a[s] - b[s] for s in seeds])
    result["seeds"] = seeds
    return result


def excludes_zero(interval: Sequence[float] | None) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def gap_closed(method_vs_galore: dict[str, Any], adamw_vs_galore: dict[str, Any]) -> tuple[float | None, str]:
    """(L_GaLore - L_method) / (L_GaLore - L_AdamW) and why it is missing when it is.

    Only defined where the gap L_GaLore - L_AdamW is clearly positive: its 95% interval (paired over seeds) lies
    above zero. Arguments are :func:`paired_difference` results of ``method - galore`` and ``adamw - galore``.
    """
    gap = adamw_vs_galore
    if gap["mean"] is None:
        return None, "no common seeds of AdamW and GaLore"
    if gap["ci95"] is None:
        return None, "one seed: the gap has no uncertainty estimate"
    if not gap["ci95"][1] < 0:  # adamw - galore < 0 <=> galore - adamw > 0
        verdict = "clearly worse than" if gap["ci95"][0] > 0 else "not clearly better than"
        return None, (
            f"AdamW is {verdict} GaLore (L_GaLore - L_AdamW = {-gap['mean']:.4f}, "
            f"95% interval [{-gap['ci95'][1]:.4f}, {-gap['ci95'][0]:.4f}]: no gap to close)"
        )
    if method_vs_galore["mean"] is None:
        return None, "no common seeds with GaLore"
    return method_vs_galore["mean"] / gap["mean"], ""


def fmt_mean_std(stats: dict[str, Any], digits: int = 3) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.{digits}f}" + ("" if stats["std"] is None else f" +- {stats['std']:.{digits}f}")


def fmt_interval(interval: Sequence[float] | None, digits: int = 3) -> str:
    return "-" if interval is None else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def fmt_difference(diff: dict[str, Any], digits: int = 3) -> str:
    """``+0.012 [-0.004, 0.028]`` (mean of the paired differences and its 95% interval), ``*`` where it excludes 0."""
    if diff["mean"] is None:
        return "-"
    mark = "*" if excludes_zero(diff["ci95"]) else ""
    return f"{diff['mean']:+.{digits}f} {fmt_interval(diff['ci95'], digits)}{mark}"
