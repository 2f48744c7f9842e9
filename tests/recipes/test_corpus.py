"""Tests of the embedded corpus: content, determinism, hash stability."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lowrank_recipes.recipes.data import corpus
from lowrank_recipes.recipes.data.corpus import corpus_hash, load_corpus, read_pydoc_topics, stdlib_files


def test_topics_are_read_from_the_file() -> None:
    topics = read_pydoc_topics()
    assert len(topics) > 50
    assert any(t.startswith('The "if" statement') for t in topics)


def test_file_list_skips_tests_and_site_packages() -> None:
    root = corpus.stdlib_root()
    rel = [p.relative_to(root).as_posix() for p in stdlib_files()]
    assert rel == sorted(rel)
    assert "argparse.py" in rel and "json/decoder.py" in rel
    for part in ("test/", "tests/", "site-packages/", "idlelib/", "lib2to3/", "encodings/"):
        assert not any(r.startswith(part) or f"/{part}" in r for r in rel), part


def test_corpus_is_deterministic(small_docs: list[str]) -> None:
    # Rebuilt from scratch (`limit` bypasses the memo): same documents, same order.
    again = load_corpus(limit=len(small_docs))
    assert again == small_docs and again is not small_docs
    assert corpus_hash(again) == corpus_hash(small_docs)
    assert all(isinstance(d, str) and d.strip() for d in small_docs)
    # Topics first, in sorted topic order; then the stdlib files in path order.
    topics = read_pydoc_topics()
    assert small_docs[: len(topics)] == topics
    first_file = next(d for d in map(corpus.file_document, stdlib_files()) if d is not None)
    assert small_docs[len(topics)] == first_file


def test_docstrings_in_source_order(tmp_path: Path) -> None:
    (tmp_path / "pydoc_data").mkdir()
    (tmp_path / "pydoc_data" / "topics.py").write_text("topics = {'b': 'Second.', 'a': 'First.'}\n")
    (tmp_path / "mod.py").write_text(
        '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
        'if True:\n    def g():\n        """Nested doc."""\n'
    )
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""Skipped."""\n')
    docs = load_corpus(root=tmp_path)
    assert docs == ["First.", "Second.", "Module doc.\n\nClass doc.\n\nMethod doc.\n\nNested doc."]


def test_hash_is_stable_and_counts_boundaries() -> None:
    # Fixed value: the hash keys the tokenizer cache, so it must not change between releases.
    expected = hashlib.sha256((2).to_bytes(8, "little") + b"ab" + (1).to_bytes(8, "little") + b"c").hexdigest()
    assert corpus_hash(["ab", "c"]) == expected
    assert corpus_hash(["ab", "c"]) != corpus_hash(["a", "bc"])
    assert corpus_hash([]) == hashlib.sha256().hexdigest()
