"""The randomness rule: seeds from (run seed, step, normalised parameter name), the same in every process."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from lowrank.randomness import draw_generator, draw_seed, normalize_param_name

TRIPLES = [
    (0, 0, "layers.0.self_attn.q_proj.weight"),
    (17, 200, "layers.3.mlp.down_proj.weight"),
    (2**40 + 3, 123456, "h.11.attn.c_attn.weight"),
    (5, 7, "ünïcode.wéight"),
]


def test_seed_is_the_same_in_another_process():
    # A different PYTHONHASHSEED in the child: a seed built on Python's salted hash() would differ.
    code = (
        "import json, sys\n"
        "from lowrank.randomness import draw_seed\n"
        "print(json.dumps([draw_seed(s, t, n) for s, t, n in json.loads(sys.argv[1])]))\n"
    )
    hash_seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "777"
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(TRIPLES)],
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(result.stdout) == [draw_seed(s, t, n) for s, t, n in TRIPLES]


@pytest.mark.parametrize("seed,step,name", TRIPLES)
def test_seed_is_a_deterministic_non_negative_63_bit_int(seed, step, name):
    value = draw_seed(seed, step, name)
    assert isinstance(value, int)
    assert 0 <= value < 2**63
    assert draw_seed(seed, step, name) == value


def test_seeds_differ_across_seed_step_and_name():
    seeds = [0, 1, 2, 1234]
    steps = [0, 1, 200, 400, 10**6]
    names = ["layers.0.q_proj.weight", "layers.0.k_proj.weight", "layers.1.q_proj.weight", "q_proj.weight", "a"]
    values = {draw_seed(s, t, n) for s, t, n in itertools.product(seeds, steps, names)}
    assert len(values) == len(seeds) * len(steps) * len(names)
    # Swapping seed and step must not collide either.
    assert draw_seed(3, 5, "w") != draw_seed(5, 3, "w")


PLAIN = "layers.0.self_attn.q_proj.weight"
WRAPPED = [
    "_orig_mod.layers.0.self_attn.q_proj.weight",
    "layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight",
    "_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.self_attn.q_proj.weight",
    "_orig_mod.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight",
    "_orig_mod._fsdp_wrapped_module.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj.weight",
]


@pytest.mark.parametrize("wrapped", WRAPPED)
def test_wrapper_prefixes_give_the_plain_seed(wrapped):
    assert normalize_param_name(wrapped) == PLAIN
    assert draw_seed(3, 400, wrapped) == draw_seed(3, 400, PLAIN)
    a, b = draw_generator(3, 400, wrapped), draw_generator(3, 400, PLAIN)
    assert torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


def test_normalize_leaves_plain_names_alone():
    for name in (PLAIN, "model.embed_tokens.weight", "orig_mod.weight", "w"):
        assert normalize_param_name(name) == name


@pytest.mark.parametrize("seed,step,name", TRIPLES)
def test_generator_is_cpu_seeded_and_reproducible(seed, step, name):
    before = torch.get_rng_state()
    a, b = draw_generator(seed, step, name), draw_generator(seed, step, name)
    assert a is not b
    assert a.device == torch.device("cpu")
    assert a.initial_seed() == draw_seed(seed, step, name)
    draw_a, draw_b = torch.randn(16, generator=a), torch.randn(16, generator=b)
    assert torch.equal(draw_a, draw_b)
    assert torch.equal(torch.get_rng_state(), before)
    other = draw_generator(seed, step + 1, name)
    assert not torch.equal(torch.randn(16, generator=other), draw_a)


def test_generator_does_not_depend_on_global_rng():
    torch.manual_seed(0)
    a = torch.randn(8, generator=draw_generator(1, 2, "w"))
    torch.manual_seed(99)
    torch.randn(100)
    b = torch.randn(8, generator=draw_generator(1, 2, "w"))
    assert torch.equal(a, b)
