"""Lightning callbacks of lowrank-recipes; they work with any LightningModule whose optimizer is a
``lowrank.LowRankOptimizer``. When bases refresh is the optimizer's own ``RefreshSchedule``; the callbacks run,
time, watch and log it.

* :class:`SubspaceResampler`: runs the schedule's refreshes in ``on_before_optimizer_step`` (the accumulated,
  unscaled, unclipped gradient), fills in ``trainer.max_steps`` for a selector switch, logs the refresh time.
* :class:`SubspaceOverlapMonitor`: how much each refresh moved the subspaces (overlap vs chance r/d), a picture of
  it, and a warning when the subspace freezes. A refresh listener of the optimizer: works with the resampler, with
  per-layer updates, and with the optimizer refreshing on its own.
* :class:`RefreshSubscriber`: base of any callback that wants every refresh's records (the monitor is one).
* :class:`PerLayerUpdates`: steps each weight inside backward (lowrank.per_layer), freeing its gradient at once.
* :class:`ProjectGradients`: backward forms the low-rank weights' gradients in projected form (lowrank.projected),
  the full gradient only on refresh steps; one device, DDP or FSDP2.
* :class:`POETMerges`: merges a POET model's rotations into its fixed weights on schedule (W0 <- R W0 P, lowrank.poet)
  and logs the orthogonality error, the generators' norm and the spectrum drift.
* :class:`ModuleDeltaMonitor`: how far each module type and layer moved from a reference (the run's start or a
  checkpoint): L2 and relative change, share of the squared change, histograms and bimodality of the element-wise
  relative change, a heatmap (lowrank.module_delta).
* :class:`FiniteLossGuard`: stops the run at the first non-finite loss, before the optimizer step (ranks agree).
* :class:`GracefulStop`: on SIGTERM or SIGINT, saves the step's checkpoint at the next optimizer-step boundary and
  stops with :class:`RunStopped` (exit status 143 / 130); a second Ctrl+C stops at once.
* :class:`OptimizerStatePrecision`: checks that the strategy can hold bf16 / 8-bit optimizer states and converts a
  resumed checkpoint's states to the run's precision.

Usage::

    trainer = Trainer(callbacks=[SubspaceResampler(), SubspaceOverlapMonitor()], ...)

Resuming: a checkpoint restores the optimizer (bases, moments, step counter, draw seed) and every callback's state, so
the refreshes and draws repeat the uninterrupted run's. The run as a whole repeats it only if the data does: exact
resume needs a resumable data loader, such as torchdata's ``StatefulDataLoader`` (Lightning saves its position in the
checkpoint; resumed mid-epoch bit-exactly in ``tests/callbacks/test_data_resume.py``; let it shuffle with its own
generator: a ``generator=`` argument is not part of its saved state in torchdata 0.11, so the epochs after the resumed
one would be shuffled differently); a plain shuffled ``DataLoader`` resumes with another order (in a foreign project
the losses then differed from the uninterrupted run's by up to 0.235).
"""

from lowrank_recipes.callbacks.atomic_checkpoint import AtomicModelCheckpoint, CheckpointWriteError
from lowrank_recipes.callbacks.finite_loss import FiniteLossGuard, NonFiniteError
from lowrank_recipes.callbacks.graceful_stop import GracefulStop, RunStopped
from lowrank_recipes.callbacks.module_delta import ModuleDeltaMonitor
from lowrank_recipes.callbacks.overlap_monitor import SubspaceOverlapMonitor
from lowrank_recipes.callbacks.per_layer import PerLayerUpdates
from lowrank_recipes.callbacks.poet import POETMerges
from lowrank_recipes.callbacks.projected import ProjectGradients
from lowrank_recipes.callbacks.resampler import SubspaceResampler
from lowrank_recipes.callbacks.state_precision import OptimizerStatePrecision
from lowrank_recipes.callbacks.subscriber import RefreshSubscriber

__all__ = [
    "AtomicModelCheckpoint",
    "CheckpointWriteError",
    "FiniteLossGuard",
    "GracefulStop",
    "ModuleDeltaMonitor",
    "NonFiniteError",
    "OptimizerStatePrecision",
    "POETMerges",
    "PerLayerUpdates",
    "ProjectGradients",
    "RefreshSubscriber",
    "RunStopped",
    "SubspaceOverlapMonitor",
    "SubspaceResampler",
]
