"""Tests of PackedStream: per-rank data, endless passes, exact loader-level resume with workers."""

from __future__ import annotations

import itertools
import multiprocessing as mp
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lowrank_recipes.recipes.data.packing import iter_packed
from lowrank_recipes.recipes.data.sources import files_spec, iter_texts, open_stream, shard_for_rank
from lowrank_recipes.recipes.data.stream import NOMINAL_LENGTH, PackedStream
from lowrank_recipes.recipes.data.tokenizer import TextTokenizer

from .conftest import write_c4_shards

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
    one_pass = len(
        list(iter_packed(iter_texts(open_stream(files_spec(c4_shards["train"]), "train")), tiny_tokenizer, SEQ_LEN))
    )
    stream = make_stream(c4_shards["train"], tiny_tokenizer)
    assert len(list(itertools.islice(iter(stream), 2 * one_pass + 3))) == 2 * one_pass + 3
    assert stream.state_dict()["pass"] == 2
    # The passes moved a private copy's epoch: the shared one (every worker's, in shared memory) stays 0.
    assert stream.source.epoch == 0


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [3, 110])  # inside the first pass (99 batches); in the second
def test_loader_resume_is_exact(
    c4_shards: dict[str, list[str]], tiny_tokenizer: TextTokenizer, num_workers: int, stop: int
) -> None:
    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(
            make_stream(c4_shards["train"], tiny_tokenizer), batch_size=4, num_workers=num_workers
        )

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


def test_resume_is_exact_when_a_worker_starts_late(tmp_path: Path, tiny_tokenizer: TextTokenizer) -> None:
    """A slow worker's `set_epoch` lands between a sibling's `set_epoch` and its read: no effect on the data.

    `datasets` keeps a stream's epoch in shared memory, inherited by every forked worker. When the workers
    shared one stream object, the resumed worker 0 started its next pass (set_epoch(P + 1)), worker 1 then
    started late (set_epoch(P)), and worker 0 read epoch P: it matched the saved position (end of pass P),
    so worker 0 skipped pass P + 1. The real race (two workers at a pass boundary at once) was timing-
    dependent; here events force that interleaving in the resumed loader's workers, every run.
    """
    shards = write_c4_shards(tmp_path / "c4", "train", shards=4, docs_per_shard=2)  # short passes (~16 batches)
    ctx = mp.get_context("fork")
    worker0_advanced, worker1_set = ctx.Event(), ctx.Event()

    def delay_worker_1(worker_id: int) -> None:  # runs in the worker process: patches that process only
        original = datasets.IterableDataset.set_epoch
        calls = itertools.count(1)

        def set_epoch(self: datasets.IterableDataset, epoch: int) -> None:
            call = next(calls)
            if worker_id == 1 and call == 1:
                worker0_advanced.wait(timeout=30)  # start late: after worker 0 moved to its next pass
            original(self, epoch)
            if worker_id == 0 and call == 2:
                worker0_advanced.set()
                worker1_set.wait(timeout=30)  # read the epoch only after worker 1 has set its own
            if worker_id == 1 and call == 1:
                worker1_set.set()

        datasets.IterableDataset.set_epoch = set_epoch  # type: ignore[method-assign]

    def loader(**kwargs: Any) -> StatefulDataLoader:
        return StatefulDataLoader(
            make_stream(shards, tiny_tokenizer), batch_size=4, num_workers=2, multiprocessing_context=ctx, **kwargs
        )

    stop, total = 20, 44  # stop inside pass 1; the tail runs through pass 2 into pass 3 for both workers
    reference = ids(list(itertools.islice(iter(loader()), total)))
    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(stop)]
    state = first.state_dict()
    del iterator
    assert {w["dataset_state"]["pass"] for w in state["_snapshot"]["_worker_snapshots"].values()} == {1}
    resumed = loader(worker_init_fn=delay_worker_1)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), total - stop))
    assert worker0_advanced.is_set() and worker1_set.is_set()  # the interleaving did happen
    assert ids(head) + ids(tail) == reference
