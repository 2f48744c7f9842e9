"""Target patterns (``optimizer.lowrank.targets``): which named tensors a rule applies to.

One rule for the low-rank optimizer (:mod:`lowrank.factory`), POET (:mod:`lowrank.poet`) and the trainable
selection (:mod:`lowrank.trainable`): each pattern is a
regular expression searched (``re.search``) in the candidate names, the first pattern that matches a name wins, and a
pattern that matches no candidate is an error (a typo would silently leave weights out).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

KEY = "optimizer.lowrank.targets"


def match_targets(names: Sequence[str], patterns: Sequence[str], nothing: str, key: str = KEY) -> dict[str, str]:
    """name -> the first pattern that matches it, for every name some pattern matches (in ``names``' order).

    Args:
        names: the candidates (e.g. the 2-D parameters' names, or ``<module>.weight`` of every linear).
        patterns: regular expressions.
        nothing: the end of the error for unused patterns, after "match no " (what the candidates are and what is
            accepted).
        key: the config key the patterns come from, named in every error (``model.trainable`` uses the same rule).

    Raises:
        ValueError: a pattern is not a regular expression, or matches none of ``names``.
    """
    compiled = []
    for pattern in patterns:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except re.error as err:
            raise ValueError(f"{key}: {pattern!r} is not a regular expression ({err})") from None
    chosen = {}
    for name in names:
        pattern = next((p for p, regex in compiled if regex.search(name)), None)
        if pattern is not None:
            chosen[name] = pattern
    unused = [p for p, _ in compiled if p not in chosen.values()]
    if unused:
        raise ValueError(f"{key}: pattern(s) {unused} match no {nothing}")
    return chosen
