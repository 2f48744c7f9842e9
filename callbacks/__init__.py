"""Lightning callbacks of lowrank-recipes; they work with any LightningModule whose optimizer is a
``lowrank.LowRankOptimizer``.

* :class:`SubspaceResampler`: when bases are refreshed (every ``update_gap`` optimizer steps, optionally staggered
  across layers, optionally switching selector part-way: GoLore), with the wall time of each refresh.
* :class:`SubspaceOverlapMonitor`: how much each refresh moved the subspaces (overlap vs chance r/d), a picture of
  it, and a warning when the subspace freezes. It reads the resampler's refreshes (subscribes to it).
* :class:`RefreshSubscriber`: base of any callback that wants every refresh's records (the monitor is one).
* :class:`PerLayerUpdates`: steps each weight inside backward (lowrank.per_layer), freeing its gradient at once.
* :class:`OptimizerStatePrecision`: checks that the strategy can hold bf16 / 8-bit optimizer states and converts a
  resumed checkpoint's states to the run's precision.

Usage::

    trainer = Trainer(callbacks=[SubspaceResampler(), SubspaceOverlapMonitor()], ...)
"""

from callbacks.overlap_monitor import SubspaceOverlapMonitor
from callbacks.per_layer import PerLayerUpdates
from callbacks.resampler import RefreshSubscriber, SubspaceResampler
from callbacks.state_precision import OptimizerStatePrecision

__all__ = ["OptimizerStatePrecision", "PerLayerUpdates", "RefreshSubscriber", "SubspaceOverlapMonitor", "SubspaceResampler"]
