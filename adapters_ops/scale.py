"""`scale`: an adapter whose update is `factor` times the input's.

PEFT adds `scaling * B @ A` to each base weight, so multiplying every B by the
factor scales the update exactly (A and the config stay as they are). 0.5
halves the adapter's effect, -1 negates it (task-vector negation).
"""

from __future__ import annotations

import math
import re

from .adapter import Adapter, AdapterLike, as_adapter
from .errors import AdapterError

# The tensors of the update's output side: lora_B (and its bias, with lora_bias) and the
# embedding adapters' lora_embedding_B. lora_A keys stay; anything else cannot be scaled.
_OUTPUT_SIDE = re.compile(r"\.lora_(B|embedding_B)(\.|$)")
_INPUT_SIDE = re.compile(r"\.lora_(A|embedding_A)(\.|$)")


def scale(adapter: AdapterLike, factor: float) -> Adapter:
    """A new Adapter with every B multiplied by `factor`, in the tensors' own dtype."""
    lora = as_adapter(adapter)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor):
        raise AdapterError(f"factor must be a finite number, got {factor!r}", "invalid_parameter")
    if lora.config.get("use_dora"):
        # DoRA renormalises B @ A per column: scaling B does not scale its update.
        raise AdapterError("a DoRA adapter's update does not scale with B; scale supports plain LoRA",
                           "unsupported_adapter")
    others = [k for k in lora.tensors if not (_OUTPUT_SIDE.search(k) or _INPUT_SIDE.search(k))]
    if others:
        # modules_to_save hold whole replacement weights, not an update to scale.
        raise AdapterError(f"{others[0]} is not a LoRA factor (modules_to_save?): its effect cannot be scaled",
                           "unsupported_adapter")
    tensors = {k: (t.float() * factor).to(t.dtype) if _OUTPUT_SIDE.search(k) else t.clone()
               for k, t in lora.tensors.items()}
    return Adapter(config=dict(lora.config), tensors=tensors)
