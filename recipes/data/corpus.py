"""The embedded default corpus: English text that ships with every Python installation.

Two sources, read as text and parsed with `ast` (nothing is imported, nothing is downloaded):

1. `pydoc_data/topics.py`: the help texts that `help("...")` prints (the language reference, about
   90 topics), one document per topic, in sorted topic order.
2. The docstrings of the standard library's `.py` files under `sysconfig.get_paths()["stdlib"]`:
   one document per file (its module, class and function docstrings in source order, joined by blank
   lines), files in sorted path order. Test suites, site-packages, IDLE, lib2to3, the turtle demos,
   ensurepip and the generated codec tables in `encodings` are skipped (see `EXCLUDED_DIRS`); files
   that fail to parse are skipped.

The corpus depends on the Python version (its stdlib), so everything derived from it (the default
tokenizer's cache key) is keyed by `corpus_hash`. Nothing is cached on disk here; `load_corpus`
memoises the full document list per process.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

# Directory names skipped anywhere under the stdlib root: test suites and vendored trees (not
# English prose), IDLE and lib2to3 (large, code-heavy), encodings (hundreds of generated codec
# docstrings that repeat one template), pydoc_data (read separately, as the topics source).
EXCLUDED_DIRS: frozenset[str] = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "encodings",
        "pydoc_data",
        "lib-dynload",
        "__phello__",
    }
)

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    """Returns the directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_pydoc_topics(root: Path | None = None) -> list[str]:
    """Reads the `pydoc_data.topics.topics` help texts without importing the module.

    Args:
        root: stdlib directory; defaults to `stdlib_root()`.

    Returns:
        The topic texts, sorted by topic name; empty if the file is missing or unparsable.
    """
    path = (root or stdlib_root()) / "pydoc_data" / "topics.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return []
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "topics" for t in targets):
            topics = ast.literal_eval(node.value)
            return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]
    return []


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Yields the docstrings of `node` and of the classes/functions nested in it, in source order."""
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            yield doc.strip()
    # Definitions only live in statement lists (bodies, else/finally blocks, handlers, match cases),
    # so recursing through statements and skipping expressions finds them all, faster.
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, ()) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _docstrings(child)


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Lists the stdlib `.py` files that feed the corpus, in sorted path order.

    Args:
        root: stdlib directory; defaults to `stdlib_root()`.

    Returns:
        Paths whose directories (relative to `root`) avoid `EXCLUDED_DIRS` and `config-*`.
    """
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so excluded trees (site-packages, test) are never walked.
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    # Sort on the relative POSIX path so the order does not depend on the filesystem.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def file_document(path: Path) -> str | None:
    """Returns one file's docstrings joined by blank lines, or None (no docstrings, unparsable)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    text = "\n\n".join(_docstrings(tree))
    return text or None


def iter_corpus(root: Path | None = None) -> Iterator[str]:
    """Yields the corpus documents lazily, in corpus order (pydoc topics, then stdlib files)."""
    base = root or stdlib_root()
    yield from read_pydoc_topics(base)
    for path in stdlib_files(base):
        doc = file_document(path)
        if doc is not None:
            yield doc


@functools.lru_cache(maxsize=2)
def _full_corpus(root: str) -> tuple[str, ...]:
    return tuple(iter_corpus(Path(root)))


def load_corpus(root: Path | None = None, limit: int | None = None) -> list[str]:
    """Builds the embedded corpus deterministically (same interpreter -> same list).

    Parsing the whole stdlib takes a few seconds, so the full corpus is memoised per process; with
    `limit`, only as many files as needed are parsed.

    Args:
        root: stdlib directory; defaults to `stdlib_root()`.
        limit: keep only the first `limit` documents (None: all).

    Returns:
        The documents: pydoc topics first, then one document per stdlib file.
    """
    base = root or stdlib_root()
    if limit is None:
        return list(_full_corpus(str(base)))
    return list(itertools.islice(iter_corpus(base), limit))


def corpus_hash(documents: Sequence[str]) -> str:
    """Returns the sha256 hex digest of a document list.

    Each document is hashed with its byte length as a prefix, so document boundaries count:
    `["ab", "c"]` and `["a", "bc"]` hash differently.
    """
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()
