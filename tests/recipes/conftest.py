"""Shared fixtures of the recipe tests: a small corpus slice, a tiny cached BPE, C4-formatted shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowrank_recipes.recipes.data.corpus import load_corpus
from lowrank_recipes.recipes.data.tokenizer import TextTokenizer, embedded_tokenizer

# Small enough to parse and train on in about a second, large enough for a few hundred sequences.
SMALL_DOCS = 120
SMALL_VOCAB = 384


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keeps `datasets` off the network and every cache out of the home directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LOWRANK_RECIPES_CACHE", str(tmp_path_factory.getbasetemp() / "lowrank-cache"))


@pytest.fixture(scope="session")
def small_docs() -> list[str]:
    """The first `SMALL_DOCS` documents of the embedded corpus."""
    return load_corpus(limit=SMALL_DOCS)


@pytest.fixture(scope="session")
def tiny_tokenizer(small_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    """A `SMALL_VOCAB` BPE trained on `small_docs`, cached in a session temp dir."""
    return embedded_tokenizer(small_docs, SMALL_VOCAB, tmp_path_factory.mktemp("tok"))


def write_c4_shards(directory: Path, prefix: str, shards: int, docs_per_shard: int) -> list[str]:
    """Writes C4-formatted JSON-lines shards (text, timestamp, url) and returns their paths.

    Each text names its shard and index ("c4 doc s-i") and repeats it so documents span several
    packed sequences.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = directory / f"c4-{prefix}.{s:05d}-of-{shards:05d}.json"
        with path.open("w", encoding="utf-8") as f:
            for i in range(docs_per_shard):
                text = f"c4 doc {s}-{i}: " + " ".join(f"word{(s * 31 + i * 7 + k) % 97}" for k in range(40))
                record = {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{s}/{i}"}
                f.write(json.dumps(record) + "\n")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def c4_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Four training shards of 12 documents and one validation shard of 12, in C4's JSON-lines format."""
    root = tmp_path_factory.mktemp("c4")
    return {
        "train": write_c4_shards(root, "train", shards=4, docs_per_shard=12),
        "validation": write_c4_shards(root, "validation", shards=1, docs_per_shard=12),
    }
