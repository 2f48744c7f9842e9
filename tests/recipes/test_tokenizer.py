"""Tests of tokenizer loading: deterministic BPE training, caching, round trip, EOS lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from lowrank_recipes.recipes.data.tokenizer import (
    EMBEDDED_EOS,
    TextTokenizer,
    embedded_tokenizer,
    embedded_tokenizer_path,
    load_tokenizer,
)

from .conftest import SMALL_VOCAB


def test_training_is_deterministic_across_cache_dirs(small_docs: list[str], tmp_path: Path) -> None:
    docs = small_docs[:60]
    first = embedded_tokenizer(docs, 300, tmp_path / "a")
    second = embedded_tokenizer(docs, 300, tmp_path / "b")
    path_a = embedded_tokenizer_path(docs, 300, tmp_path / "a")
    path_b = embedded_tokenizer_path(docs, 300, tmp_path / "b")
    assert path_a.read_bytes() == path_b.read_bytes()
    assert path_a.parent.name == path_b.parent.name  # keyed by corpus hash + vocab size only
    assert first.vocab_size == second.vocab_size == 300
    assert first.eos_id == second.eos_id == 0


def test_cache_key_depends_on_documents_and_size(small_docs: list[str], tmp_path: Path) -> None:
    base = embedded_tokenizer_path(small_docs[:10], 300, tmp_path)
    assert embedded_tokenizer_path(small_docs[:11], 300, tmp_path) != base
    assert embedded_tokenizer_path(small_docs[:10], 301, tmp_path) != base


def test_cached_file_is_reused(small_docs: list[str], tmp_path: Path) -> None:
    embedded_tokenizer(small_docs[:20], 280, tmp_path)
    path = embedded_tokenizer_path(small_docs[:20], 280, tmp_path)
    stamp = path.stat().st_mtime_ns
    embedded_tokenizer(small_docs[:20], 280, tmp_path)
    assert path.stat().st_mtime_ns == stamp


def test_round_trip(tiny_tokenizer: TextTokenizer, small_docs: list[str]) -> None:
    assert tiny_tokenizer.vocab_size == SMALL_VOCAB
    for text in (small_docs[0][:500], "Unicode survives: café, 東京, 🙂\n\ttabs", ""):
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text
        assert tiny_tokenizer.eos_id not in ids
    assert tiny_tokenizer.encode_batch(["a b", "c"]) == [tiny_tokenizer.encode("a b"), tiny_tokenizer.encode("c")]


def test_load_by_path_and_directory(tiny_tokenizer: TextTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tiny_tokenizer.tokenizer.save(str(path))
    for spec in (str(path), str(tmp_path)):
        loaded = load_tokenizer(spec)
        assert loaded.eos_id == tiny_tokenizer.eos_id == 0
        assert loaded.encode("hello world") == tiny_tokenizer.encode("hello world")


def test_missing_eos_names_the_candidates(tmp_path: Path) -> None:
    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=EMBEDDED_EOS.replace("|", r"\|")):
        load_tokenizer(str(tmp_path))
    assert load_tokenizer(str(tmp_path), eos_token="a").eos_id == 0


def test_vocab_size_too_small(small_docs: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least 258"):
        embedded_tokenizer(small_docs[:5], 100, tmp_path)
