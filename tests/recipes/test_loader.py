"""Tests of RankStatefulDataLoader: every rank's stream position survives a rank-0-only checkpoint."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowrank_recipes.recipes.data.loader import RankStatefulDataLoader
from lowrank_recipes.recipes.data.sources import files_spec, open_stream
from lowrank_recipes.recipes.data.stream import PackedStream
from lowrank_recipes.recipes.data.tokenizer import TextTokenizer, load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def make_loader(shards: list[str], tok: TextTokenizer, rank: int, world_size: int) -> RankStatefulDataLoader:
    stream = PackedStream(open_stream(files_spec(shards), "train"), tok, 16, rank=rank, world_size=world_size)
    return RankStatefulDataLoader(stream, batch_size=2, rank=rank, world_size=world_size)


def take(loader: RankStatefulDataLoader, n: int) -> list[list[list[int]]]:
    return [b["input_ids"].tolist() for b in itertools.islice(iter(loader), n)]


def _rank_main(rank: int, world_size: int, shards: list[str], tokenizer_path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world_size)
    tok = load_tokenizer(tokenizer_path)
    reference = take(make_loader(shards, tok, rank, world_size), 8)
    first = make_loader(shards, tok, rank, world_size)
    iterator = iter(first)
    head = [next(iterator)["input_ids"].tolist() for _ in range(3 + rank)]  # ranks at different positions
    state = first.state_dict()  # collective: every rank's state, as Lightning gathers it when saving
    if rank == 0:
        torch.save(state, f"{out}/checkpoint.pt")  # only rank 0 writes, like Lightning
    dist.barrier()
    resumed = make_loader(shards, tok, rank, world_size)
    resumed.load_state_dict(torch.load(f"{out}/checkpoint.pt", weights_only=False))
    tail = take(resumed, 8 - len(head))
    Path(f"{out}/rank{rank}.json").write_text(json.dumps({"reference": reference, "resumed": head + tail}))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_each_rank_resumes_from_its_own_position(
    c4_shards: dict[str, list[str]], tiny_tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    tokenizer_path = str(tmp_path / "tokenizer.json")
    tiny_tokenizer.tokenizer.save(tokenizer_path)
    # spawn, not fork: forking the pytest process after it ran torch threads (or set up a process group) can
    # deadlock or confuse a child; spawned children start clean, at the price of importing torch again.
    mp.start_processes(
        _rank_main,
        args=(2, c4_shards["train"], tokenizer_path, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["resumed"] == r["reference"]
    assert results[0]["reference"] != results[1]["reference"]  # ranks stream different shards


def test_single_rank_state_round_trip(c4_shards: dict[str, list[str]], tiny_tokenizer: TextTokenizer) -> None:
    reference = take(make_loader(c4_shards["train"], tiny_tokenizer, 0, 1), 6)
    first = make_loader(c4_shards["train"], tiny_tokenizer, 0, 1)
    head = take(first, 2)
    state = first.state_dict()
    assert state["world_size"] == 1 and len(state["ranks"]) == 1
    resumed = make_loader(c4_shards["train"], tiny_tokenizer, 0, 1)
    resumed.load_state_dict(state)
    assert head + take(resumed, 4) == reference


def test_world_size_mismatch_is_refused(c4_shards: dict[str, list[str]], tiny_tokenizer: TextTokenizer) -> None:
    state = make_loader(c4_shards["train"], tiny_tokenizer, 0, 1).state_dict()
    with pytest.raises(ValueError, match="saved with world_size=1, this run has world_size=2"):
        make_loader(c4_shards["train"], tiny_tokenizer, 1, 2).load_state_dict(state)
