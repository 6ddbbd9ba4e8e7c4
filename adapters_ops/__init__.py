"""The tensor library of the adapter hub (no Django, no web): adapters, ComPEFT,
merging, transfer, Trans-LoRA, QA-LoRA, evaluation and the test-bed zoo.

MKL sums a long dot product in an order that depends on the thread count unless
it runs in strict reproducibility mode, which it reads once, when it starts.
Asking for it here, before any torch work, makes training in this library
(the zoos, distillation, Trans-LoRA) give the same bytes on 1 or 2 threads;
adapters_ops._zoo_train checks that it took effect.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
