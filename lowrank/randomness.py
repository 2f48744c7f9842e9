"""The project's one randomness rule.

Every random draw (importance-sampled indices, random bases, the randomized range finder) uses a fresh CPU
``torch.Generator`` seeded from ``(run seed, optimizer step of the refresh, crc32 of the normalised parameter
name)``. Nothing reads or advances the global RNG and no generator state needs checkpointing, so:

* every data-parallel rank draws the same basis without communication, and
* a resumed run draws exactly what the uninterrupted run would have drawn.

Python's ``hash()`` is never used: it is salted per process.

The run seed (:func:`resolve_seed`): an explicit seed (``optimizer.lowrank.seed``, the optimizer's ``seed``; the
recipe passes its run seed), else Lightning's global seed when ``lightning.seed_everything`` has set it (read from the
``PL_GLOBAL_SEED`` environment variable, so this package needs no Lightning import), else 0. Never
``torch.initial_seed()``: it differs per process when nothing seeded it, and users offset it by rank, so data-parallel
ranks would draw different bases. (A run that calls ``seed_everything(seed + rank)`` gives each rank its own global
seed, and so its own draws: pass the seed explicitly there.) The optimizer stores the resolved seed in its groups
(``state_dict()``, a plain int), so a resumed run keeps the seed it started with.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from typing import NamedTuple

import torch

SEED_ENV = "PL_GLOBAL_SEED"  # set by lightning.seed_everything (lightning.fabric.utilities.seed)


class RunSeed(NamedTuple):
    """The run seed of the draws and where it came from: ``explicit``, ``PL_GLOBAL_SEED`` or ``default``."""

    value: int
    source: str


def resolve_seed(seed: int | None = None) -> RunSeed:
    """The run seed of the draws: ``seed`` when given, else the integer in ``PL_GLOBAL_SEED`` when set, else 0.

    Raises:
        ValueError: ``PL_GLOBAL_SEED`` is set but is not an integer.
    """
    if seed is not None:
        return RunSeed(int(seed), "explicit")
    text = os.environ.get(SEED_ENV, "").strip()
    if not text:
        return RunSeed(0, "default")
    try:
        return RunSeed(int(text), SEED_ENV)
    except ValueError:
        raise ValueError(
            f"{SEED_ENV}: invalid value {text!r}; accepted: an integer (lightning.seed_everything sets it), or unset "
            "(the draws then use seed 0); or pass optimizer.lowrank.seed explicitly"
        ) from None


# Name components inserted by wrappers (torch.compile, activation checkpointing, FSDP1). They are dropped wherever
# they appear as a whole dotted component, so that a wrapped and an unwrapped model draw the same bases.
WRAPPER_COMPONENTS: tuple[str, ...] = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def normalize_param_name(name: str) -> str:
    """Drops wrapper components (``_orig_mod.`` and the like) from a dotted parameter name."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def draw_seed(seed: int, step: int, name: str) -> int:
    """A 63-bit seed derived from the run seed, the refresh step and crc32 of the normalised parameter name."""
    name_crc = zlib.crc32(normalize_param_name(name).encode("utf-8"))
    digest = hashlib.blake2b(f"{int(seed)}/{int(step)}/{name_crc}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_generator(seed: int, step: int, name: str) -> torch.Generator:
    """A fresh CPU generator for the draw of parameter ``name`` at optimizer step ``step``.

    Draw on the CPU with it and move the result to the parameter's device.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(draw_seed(seed, step, name))
    return generator
