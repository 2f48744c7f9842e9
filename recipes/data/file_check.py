"""A cheap look into local data files before a run starts: does a file hold at least one document?

A JSON-lines file holds a document when one of its records has a non-empty ``text`` field (the column the recipe
reads); a ``.txt`` file is one document when it holds any non-blank character. Reading stops at the first document,
so a large shard costs one line. Compressed files (``.gz``) are read through ``gzip``. Standard library only: the
config is checked with it before the data pipeline's libraries are imported.
"""

from __future__ import annotations

import gzip
import json
from typing import IO

TEXT_FIELD = "text"


def _open(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _is_document(record: object) -> bool:
    return isinstance(record, dict) and bool(record.get(TEXT_FIELD))


def has_document(path: str) -> bool:
    """Whether ``path`` (.jsonl/.json/.txt, optionally .gz) holds at least one non-empty document.

    A record that is not JSON counts as a document here: the format error is left to the reader, which names it.
    A ``.json`` file holding one JSON array (rather than JSON lines) is read whole.
    """
    stem = path[: -len(".gz")] if path.endswith(".gz") else path
    with _open(path) as f:
        if stem.endswith(".txt"):
            return any(line.strip() for line in f)
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("[") and stem.endswith(".json"):
                f.seek(0)
                try:
                    records = json.load(f)
                except json.JSONDecodeError:
                    return True
                return any(_is_document(r) for r in records) if isinstance(records, list) else True
            try:
                if _is_document(json.loads(line)):
                    return True
            except json.JSONDecodeError:
                return True
    return False
