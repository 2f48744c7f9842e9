"""Learning-rate schedule of the reference runs: linear warm-up, then cosine decay to a floor.

    factor(s) = (s + 1) / w                                        for s < w  (w = warm-up steps)
    factor(s) = f + (1 - f) * (1 + cos(pi * (s - w) / (S - w))) / 2  for w <= s <= S, then f

with S = max_steps and floor f = min_lr_ratio. A callable object with plain attributes, so ``LambdaLR``'s
state dict (and the checkpoint) holds only plain values.
"""

from __future__ import annotations

import math


class WarmupCosine:
    """``LambdaLR`` multiplier: linear warm-up over ``warmup_steps``, cosine to ``min_ratio`` at ``max_steps``."""

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
