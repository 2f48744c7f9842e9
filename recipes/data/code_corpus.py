"""The stdlib source corpus (``data.source: stdlib_code``): the standard library's own ``.py`` files, whole.

A second embedded corpus, built offline the same way as the docstring corpus (:mod:`recipes.data.corpus`): one
document per ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, its full source text (code, comments and
docstrings), files in sorted relative-path order. Only test suites, installed third-party packages and byte-code
folders are left out (``CODE_EXCLUDED_DIRS``); everything else ships with every Python, IDLE, lib2to3 and the codec
tables included. Under CPython 3.11 that is about 730 files and 12M characters, about 3.5M tokens with a BPE of 4096
trained on it: large enough for runs of a few thousand steps of 16 x 128 tokens without many repeats.

Files are decoded as Python decodes them (the PEP 263 coding cookie, else UTF-8; ``tokenize.detect_encoding``) and
skipped when they do not decode. Nothing is imported or downloaded; the corpus depends on the Python version, so its
``corpus_hash`` keys the tokenizer cache and is logged with every run.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import tokenize
from collections.abc import Iterator
from pathlib import Path

from lowrank_recipes.recipes.data.corpus import stdlib_root

# Directory names skipped anywhere under the stdlib root: test suites, third-party packages, byte code.
CODE_EXCLUDED_DIRS: frozenset[str] = frozenset(
    {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test", "lib-dynload"}
)


def code_files(root: Path | None = None) -> list[Path]:
    """The ``.py`` files of the source corpus, in sorted relative POSIX path order (independent of the filesystem).

    Args:
        root: stdlib directory; defaults to ``stdlib_root()``.
    """
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in CODE_EXCLUDED_DIRS and not d.startswith("config-")]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_source(path: Path) -> str | None:
    """One file's source text as Python decodes it, or None (unreadable, undecodable or blank)."""
    try:
        data = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None
    text = text.removeprefix("\ufeff")
    return text if text.strip() else None


def iter_code_corpus(root: Path | None = None) -> Iterator[str]:
    """Yields the source documents lazily, in corpus order."""
    for path in code_files(root):
        text = read_source(path)
        if text is not None:
            yield text


@functools.lru_cache(maxsize=2)
def _full_code_corpus(root: str) -> tuple[str, ...]:
    return tuple(iter_code_corpus(Path(root)))


def load_code_corpus(root: Path | None = None, limit: int | None = None) -> list[str]:
    """The source corpus, deterministically (same interpreter -> same list); memoised per process.

    Args:
        root: stdlib directory; defaults to ``stdlib_root()``.
        limit: keep only the first ``limit`` documents (None: all).
    """
    base = root or stdlib_root()
    if limit is None:
        return list(_full_code_corpus(str(base)))
    return list(itertools.islice(iter_code_corpus(base), limit))
