"""Which local data files the recipe reads, by name: the extension table shared by the reader and the config check.

A file's kind is ``"json"`` (JSON lines, or one JSON array in a ``.json`` file, with a ``text`` field) or ``"text"``
(one document per file), optionally gzip-compressed (``.gz``); it is also the name of the ``datasets`` builder that
reads it (:mod:`lowrank_recipes.recipes.data.sources`). Standard library only: the config is checked with it before
the data pipeline's libraries are imported.
"""

from __future__ import annotations

from collections.abc import Sequence

# File name endings -> the kind of file (= the `datasets` builder that reads it; compressed forms are read
# transparently).
KINDS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".txt": "text",
    ".txt.gz": "text",
}
ACCEPTED = sorted(KINDS)


def file_kind(path: str) -> str | None:
    """``"json"`` or ``"text"`` for a supported file name (the longest matching ending wins), else None."""
    ending = next((e for e in sorted(KINDS, key=len, reverse=True) if path.endswith(e)), None)
    return None if ending is None else KINDS[ending]


def kinds_problem(files: Sequence[str]) -> str | None:
    """Why ``files`` cannot be read as one data set (an unsupported ending, or JSON lines mixed with text files), or
    None when they share one supported kind. The message is of the form ``problem; accepted: ...``."""
    unsupported = [f for f in files if file_kind(f) is None]
    if unsupported:
        return f"unsupported extension of {unsupported}; accepted: {ACCEPTED}"
    kinds = {f: file_kind(f) for f in files}
    if len(set(kinds.values())) > 1:
        jsonl = [f for f, k in kinds.items() if k == "json"]
        text = [f for f, k in kinds.items() if k == "text"]
        return (
            f"JSON lines {jsonl} mixed with text files {text}; accepted: all JSON lines (.jsonl/.json, optionally "
            ".gz) or all text (.txt, optionally .gz), over train and validation files together"
        )
    return None
