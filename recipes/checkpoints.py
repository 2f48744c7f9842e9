"""A cheap completeness check of checkpoints on disk, and the checkpoint ``resume=auto`` continues from.

:func:`checkpoint_problem` never loads a checkpoint; it reads only what says whether every byte was written:

* a single file (``torch.save``'s zip archive): the zip central directory, written last, opens, the archive holds a
  ``data.pkl`` record, and every member's header offset plus its size fits in the file;
* a directory (``torch.distributed.checkpoint``, fsdp2's sharded format): ``.metadata`` is readable, every shard file
  it lists is present and holds at least the bytes listed for it (offset + length), and Lightning's ``meta.pt`` passes
  the file check.

A symbolic link is checked through its target; a dangling one fails. Names starting with ``.`` are temporaries of a
write in progress (:mod:`lowrank_recipes.callbacks.atomic_checkpoint`) and never candidates.

:func:`resume_checkpoint` is ``resume=auto``'s choice in a checkpoints folder: ``last.ckpt`` when it passes, else the
newest ``step=N`` checkpoint (by N) that passes, else :class:`NoUsableCheckpointError` naming every path checked and
why it failed (a fresh start would write a new history over the old one). No folder, or one holding neither
``last.ckpt`` nor a step checkpoint, means a fresh start. Torch and the standard library only.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

LAST = "last.ckpt"
META = "meta.pt"  # Lightning's non-tensor state beside a sharded checkpoint's shards
_STEP = re.compile(r"(?:^|[-_])step=(\d+)")
_LOCAL_HEADER = 30  # bytes of a zip local file header before the member's name, extra field and data


class NoUsableCheckpointError(RuntimeError):
    """``resume=auto`` found checkpoints, and none passed the check; the message names each with its problem."""


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint at ``path`` (a file, a sharded directory, or a link to either) is incomplete, or None when it
    passes. Reads only the zip directory or the shard metadata."""
    path = Path(path)
    if not path.exists():
        return f"dangling link to {os.readlink(path)!r}" if path.is_symlink() else "missing"
    if path.is_dir():
        return _directory_problem(path)
    return _file_problem(path)


def _file_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except Exception as err:  # truncated: the central directory is cut off (BadZipFile, OSError, EOFError...)
        return f"not a complete torch.save archive ({type(err).__name__}: {err})"
    if not any(m.filename == "data.pkl" or m.filename.endswith("/data.pkl") for m in members):
        return "a zip archive without a data.pkl record (not written by torch.save)"
    for member in members:
        end = member.header_offset + _LOCAL_HEADER + len(member.filename.encode()) + member.compress_size
        if end > size:
            return f"member {member.filename!r} ends at byte {end}, past the file's {size} bytes"
    return None


def _directory_problem(path: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader  # lazily: only sharded checkpoints need it

    if not (path / ".metadata").is_file():
        return "sharded checkpoint without .metadata"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # unpickling a truncated file can raise nearly anything
        return f"unreadable .metadata ({type(err).__name__}: {err})"
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not storage:
        return ".metadata lists no shard files"
    needed: dict[str, int] = {}
    for info in storage.values():
        relative = getattr(info, "relative_path", None)
        if relative is None:
            return f".metadata entry {info!r} names no shard file"
        needed[relative] = max(needed.get(relative, 0), int(info.offset) + int(info.length))
    for relative, end in sorted(needed.items()):
        shard = path / relative
        if not shard.is_file():
            return f"shard file {relative} listed in .metadata is missing"
        if shard.stat().st_size < end:
            return f"shard file {relative} holds {shard.stat().st_size} bytes, .metadata lists {end}"
    problem = _file_problem(path / META) if (path / META).is_file() else "missing"
    return None if problem is None else f"{META}: {problem}"


def step_of(path: str | os.PathLike[str]) -> int | None:
    """The optimizer step in a checkpoint's name (``step=000010.ckpt`` -> 10), or None."""
    found = _STEP.search(Path(path).name)
    return int(found.group(1)) if found else None


def step_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``step=N`` checkpoints in ``directory``, newest (largest N) first; temporaries (``.``-names) excluded."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if not p.name.startswith(".") and step_of(p) is not None]
    return sorted(found, key=lambda p: (step_of(p), p.name), reverse=True)


@dataclass
class ResumeChoice:
    """What :func:`resume_checkpoint` decided: ``path`` (None: a fresh start) and the paths that failed, with why."""

    path: Path | None
    rejected: dict[Path, str] = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        """Whether ``last.ckpt`` (unusable or missing) was passed over for a step checkpoint."""
        return self.path is not None and bool(self.rejected)


def resume_checkpoint(directory: str | os.PathLike[str]) -> ResumeChoice:
    """``resume=auto``'s checkpoint in ``directory``: ``last.ckpt`` if it passes :func:`checkpoint_problem`, else the
    newest ``step=N`` checkpoint that does. Nothing there (no ``last.ckpt``, no step checkpoint): a fresh start
    (``path`` None). Raises :class:`NoUsableCheckpointError` when checkpoints exist and none passes."""
    directory = Path(directory)
    last = directory / LAST
    steps = step_checkpoints(directory)
    if not steps and not os.path.lexists(last):
        return ResumeChoice(None)
    rejected: dict[Path, str] = {}
    for path in [last, *steps]:
        problem = checkpoint_problem(path)
        if problem is None:
            return ResumeChoice(path, rejected)
        rejected[path] = problem
    listed = "; ".join(f"{path}: {problem}" for path, problem in rejected.items())
    raise NoUsableCheckpointError(
        f"resume=auto: no usable checkpoint in {directory} (checked {listed}); starting over would write a new "
        "history over these. Accepted: resume=PATH naming a good checkpoint, or a new out_dir (or remove "
        f"{directory}) to start over"
    )
