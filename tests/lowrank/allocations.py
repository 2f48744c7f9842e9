"""Peak bytes the CPU allocator held during a call, from torch.profiler's memory events (an oracle independent of
lowrank.memory: every tensor allocation and free the call made, in order)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def allocation_peak(fn: Callable[[], object]) -> int:
    """Bytes above what was allocated when ``fn`` started, at the highest point during the call."""
    return allocations(fn)[0]


def _trace(fn: Callable[[], object]) -> list[dict]:
    """The chrome-trace events of one profiled call of ``fn`` (CPU, memory events on)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return json.loads(trace.read_text())["traceEvents"]


def _cpu_memory(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]


def allocations(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, net): bytes above what was allocated when ``fn`` started, at the highest point during the call and
    at its end."""
    memory = [e["args"] for e in _cpu_memory(_trace(fn))]
    if not memory:
        return 0, 0
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start, memory[-1]["Total Allocated"] - start


def live_peak_within(fn: Callable[[], object], label: str) -> int:
    """Bytes allocated at the highest point inside ``record_function(label)`` ranges that ``fn`` opens, counted from
    what was allocated when ``fn`` started (so allocations made earlier in ``fn`` and still alive are included)."""
    events = _trace(fn)
    memory = _cpu_memory(events)
    ranges = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e.get("name") == label]
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    inside = [m["args"]["Total Allocated"] for m in memory if any(a <= m["ts"] <= b for a, b in ranges)]
    return max(inside) - start


def tensor_bytes(tensors: object) -> int:
    """Bytes of the tensors in a (nested) list, tuple or dict."""
    if torch.is_tensor(tensors):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(tensor_bytes(v) for v in tensors)
    return 0
