"""`RankStatefulDataLoader`: a `StatefulDataLoader` whose state holds the position of every rank.

Lightning writes one checkpoint, from rank 0, so a loader's `state_dict` from rank 0 is what every
rank gets back on resume. That is right for the map-style sampler (its state is the same on every
rank, see `recipes.data.sampler`) but wrong for a sharded stream, where each rank reads its own
shards and is at its own position. This loader's `state_dict` gathers all ranks' states
(`torch.distributed.all_gather_object`; Lightning calls `state_dict` on every rank when it saves a
checkpoint) and `load_state_dict` picks this rank's. Resuming therefore needs the same world size.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader


class RankStatefulDataLoader(StatefulDataLoader):
    """`StatefulDataLoader` with per-rank state, for datasets whose position differs between ranks.

    Args:
        *args: `StatefulDataLoader` arguments.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks (> 1 requires an initialised process group when
            `state_dict` is called).
        **kwargs: `StatefulDataLoader` keyword arguments.
    """

    def __init__(self, *args: Any, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank = rank
        self.world_size = world_size

    def state_dict(self) -> dict[str, Any]:
        """Returns {"world_size": W, "ranks": [state of rank 0, ..., state of rank W-1]} (a collective when W > 1)."""
        local = super().state_dict()
        if self.world_size == 1:
            return {"world_size": 1, "ranks": [local]}
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"world_size={self.world_size} needs an initialised process group to gather loader states"
            )
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, local)
        return {"world_size": self.world_size, "ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores this rank's entry of a `state_dict()` result.

        Raises:
            ValueError: the state was saved with another world size.
        """
        if state_dict.get("world_size") != self.world_size:
            raise ValueError(
                f"loader state was saved with world_size={state_dict.get('world_size')!r}, this run has "
                f"world_size={self.world_size}: a sharded stream resumes only with the same number of ranks"
            )
        super().load_state_dict(state_dict["ranks"][self.rank])
