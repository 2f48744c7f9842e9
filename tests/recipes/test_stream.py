"""Tests of PackedStream: per-rank data, endless passes, exact loader-level resume with workers."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lowrank_recipes.recipes.data.packing import iter_packed
from lowrank_recipes.recipes.data.sources import files_spec, iter_texts, open_stream, shard_for_rank
from lowrank_recipes.recipes.data.stream import NOMINAL_LENGTH, PackedStream
from lowrank_recipes.recipes.data.tokenizer import TextTokenizer

SEQ_LEN = 24
# torchdata 0.11 calls an API that torch 2.13 deprecates; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def make_stream(shards: list[str], tok: TextTokenizer, rank: int = 0, world_size: int = 1) -> PackedStream:
    return PackedStream(open_stream(files_spec(shards), "train"), tok, SEQ_LEN, rank=rank, world_size=world_size)


def ids(batches: list[dict[str, torch.Tensor]]) -> list[list[list[int]]]:
    return [b["input_ids"].tolist() for b in batches]


def test_stream_packs_this_ranks_documents(c4_shards: dict[str, list[str]], tiny_tokenizer: TextTokenizer) -> None:
    stream = make_stream(c4_shards["train"], tiny_tokenizer, rank=1, world_size=2)
    rank_docs = list(iter_texts(shard_for_rank(open_stream(files_spec(c4_shards["train"]), "train"), 1, 2)))
    expected = list(iter_packed(rank_docs, tiny_tokenizer, SEQ_LEN))
    got = list(itertools.islice(iter(stream), len(expected)))
    for item, chunk in zip(got, expected, strict=True):
        assert torch.equal(item["input_ids"], chunk[:-1]) and torch.equal(item["labels"], chunk[1:])
    assert len(stream) == NOMINAL_LENGTH


def test_stream_is_endless(c4_shards: dict[str, list[str]], tiny_tokenizer: TextTokenizer) -> None:
    one_pass = len(list(iter_packed(iter_texts(open_stream(files_spec(c4_shards["train"]), "train")),
                                    tiny_tokenizer, SEQ_LEN)))
    stream = make_stream(c4_shards["train"], tiny_tokenizer)
    assert len(list(itertools.islice(iter(stream), 2 * one_pass + 3))) == 2 * one_pass + 3
    assert stream.state_dict()["pass"] == 2


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [3, 110])  # inside the first pass (99 batches); in the second
def test_loader_resume_is_exact(
    c4_shards: dict[str, list[str]], tiny_tokenizer: TextTokenizer, num_workers: int, stop: int
) -> None:
    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(make_stream(c4_shards["train"], tiny_tokenizer), batch_size=4,
                                  num_workers=num_workers)

    total = stop + 6
    reference = ids(list(itertools.islice(iter(loader()), total)))
    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(stop)]
    state = first.state_dict()
    del iterator
    resumed = loader()
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), total - stop))
    assert ids(head) + ids(tail) == reference
