"""Tests of packing: EOS placement, chunk shapes, the input/label shift, streaming equivalence."""

from __future__ import annotations

import torch

from lowrank_recipes.recipes.data.packing import (
    PackedSequences,
    StreamPacker,
    iter_packed,
    pack_tokens,
    split_inputs_labels,
)
from lowrank_recipes.recipes.data.tokenizer import TextTokenizer


def test_pack_tokens_appends_eos(tiny_tokenizer: TextTokenizer) -> None:
    docs = ["first document", "second one", "third"]
    flat = pack_tokens(docs, tiny_tokenizer)
    expected = []
    for doc in docs:
        expected += tiny_tokenizer.encode(doc) + [tiny_tokenizer.eos_id]
    assert flat.dtype == torch.int32
    assert flat.tolist() == expected
    assert (flat == tiny_tokenizer.eos_id).sum().item() == len(docs)


def test_packed_sequences_shapes_and_shift(tiny_tokenizer: TextTokenizer, small_docs: list[str]) -> None:
    flat = pack_tokens(small_docs[:10], tiny_tokenizer)
    seq_len = 16
    data = PackedSequences(flat, seq_len)
    assert len(data) == flat.numel() // (seq_len + 1)
    for i in (0, 1, len(data) - 1):
        item = data[i]
        assert item["input_ids"].shape == item["labels"].shape == (seq_len,)
        assert item["input_ids"].dtype == torch.long
        chunk = flat[i * (seq_len + 1) : (i + 1) * (seq_len + 1)].long()
        assert torch.equal(item["input_ids"], chunk[:-1])
        assert torch.equal(item["labels"], chunk[1:])
        assert torch.equal(item["labels"][:-1], item["input_ids"][1:])


def test_split_inputs_labels_batched() -> None:
    chunks = torch.arange(10).view(2, 5)
    out = split_inputs_labels(chunks)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert out["labels"].tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]


def test_stream_packing_equals_map_style(tiny_tokenizer: TextTokenizer, small_docs: list[str]) -> None:
    docs = small_docs[80:150]  # more than one ENCODE_BATCH group (64)
    seq_len = 32
    streamed = torch.stack(list(iter_packed(iter(docs), tiny_tokenizer, seq_len)))
    mapped = PackedSequences(pack_tokens(docs, tiny_tokenizer), seq_len).chunks.long()
    assert torch.equal(streamed, mapped)


def test_stream_packer_resumes_from_leftover(tiny_tokenizer: TextTokenizer) -> None:
    docs = [f"document number {i} with some words" for i in range(9)]
    full = StreamPacker(tiny_tokenizer, 7)
    full.add(docs)
    reference = list(full.chunks())
    first = StreamPacker(tiny_tokenizer, 7)
    first.add(docs[:4])
    head = list(first.chunks())
    second = StreamPacker(tiny_tokenizer, 7, leftover=first.leftover())
    second.add(docs[4:])
    tail = list(second.chunks())
    assert [c.tolist() for c in head + tail] == [c.tolist() for c in reference]
