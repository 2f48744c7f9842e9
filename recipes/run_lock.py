"""One run per ``out_dir``: the launching process holds an exclusive lock on ``out_dir/.lock`` for the run's lifetime.

Two runs on one ``out_dir`` would mix their checkpoints and configs. Only global rank 0 locks: torchrun, ``fabric run``
and Lightning's own launcher start every rank with the same arguments, and the other ranks of the same run must not
take it. The lock is ``fcntl.flock`` (released by the kernel when the process ends, however it ends); the holder's pid
is written into the file so that the error can name it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"
# Set by torchrun (RANK, GROUP_RANK), Lightning's launcher and fabric run (LOCAL_RANK, NODE_RANK) in ranks other than 0.
_RANK_VARIABLES = ("RANK", "GROUP_RANK", "LOCAL_RANK", "NODE_RANK")


class RunLockedError(RuntimeError):
    """Another run holds the ``out_dir``."""


def is_global_rank_zero() -> bool:
    """Whether this process is global rank 0 of its run (or runs alone), from the launchers' environment variables."""
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


@contextmanager
def run_lock(out_dir: str) -> Iterator[None]:
    """Holds ``out_dir/.lock`` for the duration (global rank 0 only); raises :class:`RunLockedError` naming the other
    run's pid when it is taken."""
    if not is_global_rank_zero():
        yield
        return
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(
                f"out_dir: {out_dir} is in use by another run (pid {holder}); accepted: wait for that run to end, or "
                "pick another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
