"""Packing documents into fixed-length training sequences.

Every document is tokenized, followed by the end-of-document id, and the documents are concatenated
into one token stream that is cut into consecutive, non-overlapping chunks of `seq_len + 1` tokens.
A chunk c yields `input_ids = c[:-1]` and `labels = c[1:]` (each position predicts the next token);
documents run across chunk boundaries, and the tail shorter than a chunk is dropped.

Two forms share this rule:

* `pack_tokens` + `PackedSequences` (map-style): the whole corpus is tokenized once into a flat
  tensor and chunk i is a slice of it; used for the embedded corpus and local files.
* `StreamPacker` / `iter_packed` (streaming): the same cut over a document iterator with a small
  carry-over buffer; used by the C4 stream (`recipes.data.stream`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lowrank_recipes.recipes.data.tokenizer import TextTokenizer

# Documents per `encode_batch` call: large enough for the tokenizer's threads, small enough to stream.
ENCODE_BATCH = 64


def split_inputs_labels(chunk: Tensor) -> dict[str, Tensor]:
    """Splits chunk(s) (..., T + 1) into {"input_ids": (..., T), "labels": (..., T)} (int64 views)."""
    chunk = chunk.long()
    return {"input_ids": chunk[..., :-1], "labels": chunk[..., 1:]}


def pack_tokens(documents: Sequence[str], tokenizer: TextTokenizer) -> Tensor:
    """Tokenizes documents, appends EOS to each and concatenates them.

    Args:
        documents: the texts, in the order they are packed.
        tokenizer: encodes text; its `eos_id` ends every document.

    Returns:
        (N,) int32 tensor of all tokens (int32 halves the memory of int64; ids < 2^31).
    """
    pieces: list[Tensor] = []
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int32)
    for start in range(0, len(documents), ENCODE_BATCH):
        for ids in tokenizer.encode_batch(documents[start : start + ENCODE_BATCH]):
            pieces.append(torch.tensor(ids, dtype=torch.int32))
            pieces.append(eos)
    if not pieces:
        return torch.empty(0, dtype=torch.int32)
    return torch.cat(pieces)


class PackedSequences(Dataset):
    """Map-style view of a flat token tensor as `seq_len + 1`-token chunks.

    Item i is {"input_ids": tokens[i*(T+1) : i*(T+1)+T], "labels": tokens[i*(T+1)+1 : (i+1)*(T+1)]},
    both (T,) int64.

    Args:
        tokens: (N,) flat token stream from `pack_tokens`.
        seq_len: T, the model's input length.
    """

    def __init__(self, tokens: Tensor, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        n = tokens.numel() // (seq_len + 1)
        # (n, T + 1) view; share_memory_ so worker processes do not copy the corpus.
        self.chunks = tokens[: n * (seq_len + 1)].view(n, seq_len + 1).share_memory_()

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return split_inputs_labels(self.chunks[index])


class StreamPacker:
    """Incremental form of the packing rule, for streams: add documents, take full chunks.

    Args:
        tokenizer: encodes text; `eos_id` ends every document.
        seq_len: T.
        leftover: tokens carried over from an earlier stream (from `leftover()`), to resume.
    """

    def __init__(self, tokenizer: TextTokenizer, seq_len: int, leftover: Sequence[int] = ()) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokenizer = tokenizer
        self.size = seq_len + 1
        self._pending: list[int] = list(leftover)
        self._start = 0  # tokens before this offset were already emitted

    def add(self, documents: Sequence[str]) -> None:
        """Tokenizes documents and appends them, each followed by EOS."""
        # Drop what was emitted so the buffer stays below one batch of documents.
        del self._pending[: self._start]
        self._start = 0
        for ids in self.tokenizer.encode_batch(documents):
            self._pending.extend(ids)
            self._pending.append(self.tokenizer.eos_id)

    def chunks(self) -> Iterator[Tensor]:
        """Yields every complete (T + 1,) int64 chunk available now, in stream order."""
        while len(self._pending) - self._start >= self.size:
            chunk = self._pending[self._start : self._start + self.size]
            self._start += self.size
            yield torch.tensor(chunk, dtype=torch.long)

    def leftover(self) -> list[int]:
        """Returns the tokens not emitted yet (what a resumed packer starts from)."""
        return self._pending[self._start :]


def iter_packed(documents: Iterable[str], tokenizer: TextTokenizer, seq_len: int) -> Iterator[Tensor]:
    """Streams (T + 1,) chunks out of a document iterator (documents consumed in groups of `ENCODE_BATCH`)."""
    packer = StreamPacker(tokenizer, seq_len)
    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == ENCODE_BATCH:
            packer.add(batch)
            batch = []
            yield from packer.chunks()
    if batch:
        packer.add(batch)
        yield from packer.chunks()
