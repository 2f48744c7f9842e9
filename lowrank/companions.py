"""Finding projected-gradient companions by name: ``<module>.weight_projected`` beside ``<module>.weight``.

Names, not tensor attributes, because FSDP2's ``fully_shard`` replaces every parameter object with a DTensor one:
an attribute set on the weight before sharding is gone after it, the module's parameter names stay.
"""

from __future__ import annotations

from torch import nn

COMPANION = "weight_projected"


def companions_of(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Weight name (as ``model.named_parameters`` says it) -> (weight, companion), for every module holding both."""
    found = {}
    for name, module in model.named_modules():
        weight, companion = module._parameters.get("weight"), module._parameters.get(COMPANION)
        if weight is not None and companion is not None:
            found[f"{name}.weight" if name else "weight"] = (weight, companion)
    return found
