"""Fixtures shared by every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread: the tests' matrices are tiny, and on a busy 2-core machine small LAPACK calls (QR
    especially) and tiny models run many times slower with two OpenMP threads fighting over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_leftover_process_group() -> Iterator[None]:
    """A test that builds a DDP Trainer in this process (world size 1) leaves torch.distributed initialised; later
    tests that start ranks of their own would inherit it. Tear it down after every test."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
