"""Every callback test starts without a Lightning global seed (``PL_GLOBAL_SEED``, which ``seed_everything`` sets for
the rest of the process and which seeds the draws of an optimizer without an explicit seed); a test's own
``seed_everything`` is undone after it."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_lightning_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # recorded, so that teardown removes what the test set
    monkeypatch.delenv("PL_GLOBAL_SEED")
