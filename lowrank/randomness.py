"""The project's one randomness rule.

Every random draw (importance-sampled indices, random bases, the randomized range finder) uses a fresh CPU
``torch.Generator`` seeded from ``(run seed, optimizer step of the refresh, crc32 of the normalised parameter
name)``. Nothing reads or advances the global RNG and no generator state needs checkpointing, so:

* every data-parallel rank draws the same basis without communication, and
* a resumed run draws exactly what the uninterrupted run would have drawn.

Python's ``hash()`` is never used: it is salted per process.
"""

from __future__ import annotations

import hashlib
import zlib

import torch

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
