"""A resumable batch sampler whose global batches do not depend on the number of ranks.

The order of training items is one endless stream: pass e over the N items is the permutation
`randperm(N)` drawn from a CPU generator seeded by (seed, e). The stream is cut into micro-batches
of `micro_batch_size` consecutive items, numbered 0, 1, 2, ... ("global micro-batch index").
Rank r of W takes micro-batches r, r + W, r + 2W, ...: its t-th batch is global micro-batch t*W + r.

Why this is rank-count independent: an optimizer step with gradient accumulation A on W ranks
consumes global micro-batches [k*A*W, (k+1)*A*W); one rank with accumulation A*W consumes the same
set at step k. So the global batch of step k depends only on (seed, micro_batch_size,
A*W), never on how it is split over processes.

Resume: the sampler's state is one number, the global count of micro-batches consumed, which is
the same on every rank, so the checkpoint written by rank 0 restores all ranks. It implements
`state_dict` / `load_state_dict`, and `torchdata`'s `StatefulDataLoader` snapshots it with every
batch it hands out (not when workers prefetch), which is what Lightning saves in its checkpoints.

Epochs: Lightning needs a length, so `len()` is a nominal epoch of about one pass:
`floor(N / (micro_batch_size * W * A)) * A` batches per rank, with A the gradient accumulation.
Epochs only chunk the endless stream (a pass may straddle two of them; nothing is dropped or
repeated at an epoch end). The length is a multiple of A because Lightning steps the optimizer at
every epoch end, even on an incomplete accumulation; and W * A micro-batches per epoch in total is
the same for every split of the global batch, so epoch ends fall on the same steps too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

# Odd 64-bit constant (golden ratio) that spreads (seed, pass) pairs over distinct generator seeds.
_PASS_MIX = 0x9E3779B97F4A7C15


def pass_permutation(num_items: int, seed: int, pass_index: int) -> torch.Tensor:
    """Returns the (num_items,) int64 order of pass `pass_index`, drawn from a fresh seeded CPU generator."""
    generator = torch.Generator().manual_seed((seed * _PASS_MIX + pass_index) % (2**63))
    return torch.randperm(num_items, generator=generator)


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of item indices) of the seeded global order.

    Args:
        num_items: N, the number of items (packed sequences) in the dataset.
        micro_batch_size: items per micro-batch (per rank, per forward pass).
        rank: this process's data-parallel rank r.
        world_size: number of data-parallel ranks W.
        seed: fixes the order of every pass.
        accumulation: micro-batches per optimizer step on each rank (Lightning's
            `accumulate_grad_batches`); only shapes the nominal epoch length.
    """

    def __init__(
        self,
        num_items: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        accumulation: int = 1,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        per_step = world_size * accumulation
        if num_items // micro_batch_size < per_step:
            raise ValueError(
                f"{num_items} items make {num_items // micro_batch_size} micro-batches of {micro_batch_size}, "
                f"fewer than one optimizer step needs (world_size x accumulation = {per_step}): "
                "lower micro_batch_size or seq_len, or add data"
            )
        self.num_items = num_items
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.accumulation = accumulation
        self.batches_per_epoch = (num_items // micro_batch_size) // per_step * accumulation
        self._cursor = 0  # batches this rank has yielded (its next batch is global index cursor*W + r)
        self._cached_pass: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _order(self, pass_index: int) -> torch.Tensor:
        if self._cached_pass is None or self._cached_pass[0] != pass_index:
            self._cached_pass = (pass_index, pass_permutation(self.num_items, self.seed, pass_index))
        return self._cached_pass[1]

    def global_batch(self, index: int) -> list[int]:
        """Returns the item indices of global micro-batch `index` (stream positions index*B .. index*B + B - 1)."""
        items = []
        for position in range(index * self.micro_batch_size, (index + 1) * self.micro_batch_size):
            pass_index, offset = divmod(position, self.num_items)
            items.append(int(self._order(pass_index)[offset]))
        return items

    def __iter__(self) -> Iterator[list[int]]:
        # Run to the end of the current nominal epoch, so a run resumed mid-epoch gets exactly the
        # batches Lightning still expects in that epoch.
        end = (self._cursor // self.batches_per_epoch + 1) * self.batches_per_epoch
        while self._cursor < end:
            index = self._cursor * self.world_size + self.rank
            self._cursor += 1
            yield self.global_batch(index)

    def state_dict(self) -> dict[str, Any]:
        """Returns the rank-independent position: global micro-batches consumed, plus the order's identity."""
        return {
            "consumed_micro_batches": self._cursor * self.world_size,
            "num_items": self.num_items,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the position; the order's identity (num_items, micro_batch_size, seed) must match.

        Raises:
            ValueError: the state belongs to another order, or its position does not divide among
                this run's ranks.
        """
        for key in ("num_items", "micro_batch_size", "seed"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state_dict[key]!r} but this run has {key}={getattr(self, key)!r}: "
                    "resume with the same data, micro_batch_size and seed"
                )
        consumed = int(state_dict["consumed_micro_batches"])
        if consumed % self.world_size:
            raise ValueError(f"consumed_micro_batches={consumed} is not divisible by world_size={self.world_size}")
        self._cursor = consumed // self.world_size
