"""Helpers shared by the benchmarks: device choice, run metadata, peak memory, timing and markdown tables."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

# The tiny recipe every --quick mode trains (seconds per run): the model's shape, one micro-batch of 4 x 32 tokens per
# step, rank 8, a refresh every 4 steps, 8 validation sequences; each benchmark adds its layers, corpus size and
# intervals.
TINY_RECIPE: tuple[str, ...] = (
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_heads=2",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "data.micro_batch_size=4",
    "trainer.global_batch_size=4",
    "data.val_sequences=8",
    "optimizer.lowrank.rank=8",
    "optimizer.refresh.update_gap=4",
)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def run_metadata(device: torch.device, args: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to compare two result files: machine, software, threads, date and arguments."""
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # other work on the machine inflates timings: the 1/5/15-minute load averages at the start
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": args,
    }
    return meta


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quartiles(values: Sequence[float]) -> list[float]:
    """25th and 75th percentiles: the spread around the median on a shared machine."""
    if len(values) < 2:
        return [median(values)] * 2
    cuts = statistics.quantiles(values, n=4)
    return [cuts[0], cuts[2]]


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak(device: torch.device) -> None:
    """Starts the peak over: the allocator's peak on a GPU; on Linux the resident high-water mark (``ru_maxrss``
    follows it), by writing 5 to ``/proc/self/clear_refs``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def mib(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f}"
