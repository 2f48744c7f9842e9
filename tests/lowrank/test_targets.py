"""lowrank.targets.match_targets: the first matching pattern wins, unused and invalid patterns are refused by key."""

from __future__ import annotations

import pytest

from lowrank.targets import match_targets

NAMES = ["layers.0.self_attn.q_proj.weight", "layers.0.mlp.up_proj.weight", "embed_tokens.weight"]


def test_first_matching_pattern_wins_and_unmatched_names_are_left_out() -> None:
    got = match_targets(NAMES, [r"up_proj", r"_proj"], "x")
    assert got == {"layers.0.self_attn.q_proj.weight": "_proj", "layers.0.mlp.up_proj.weight": "up_proj"}
    # a pattern every one of whose names an earlier pattern took counts as matching nothing
    with pytest.raises(ValueError, match=r"pattern\(s\) \['mlp'\] match no x"):
        match_targets(NAMES, [r"_proj", r"mlp"], "x")


def test_unused_and_invalid_patterns_are_refused() -> None:
    with pytest.raises(ValueError, match=r"optimizer.lowrank.targets: pattern\(s\) \['lm_head'\] match no linear"):
        match_targets(NAMES, ["q_proj", "lm_head"], "linear")
    with pytest.raises(ValueError, match=r"optimizer.lowrank.targets: '\(unclosed' is not a regular expression"):
        match_targets(NAMES, ["(unclosed"], "linear")
