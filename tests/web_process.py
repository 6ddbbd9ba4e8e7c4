"""One check for 'the web process never loads the tensor library' (ARCHITECTURE boundary 3),
used by the API, HF-compatible and upload-validation tests: import what a web process imports,
in a fresh interpreter, and list the forbidden modules that came with it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_ROOTS = ("torch", "transformers", "peft", "safetensors", "numpy", "adapters_ops")
# Standard library only: the QA-LoRA declaration rule upload validation shares with the library,
# the op declarations (REST validation, GET /api/v1/ops, the UI's job forms) and PEFT's
# rank_pattern rule, and the safetensors header reader.
SHARED = {"adapters_ops", "adapters_ops.qalora_declaration", "adapters_ops.opspecs", "adapters_ops.peft_patterns",
          "adapters_ops.safetensors_header", "adapters_ops.lineup", "adapters_ops.errors"}


def forbidden_modules_after(imports: str, *, django_setup: bool = True, also: tuple[str, ...] = ()) -> list[str]:
    """`also`: more forbidden top-level names (upload validation, for one, loads no Django)."""
    roots = FORBIDDEN_ROOTS + also
    code = (
        ("import os, django; os.environ['DJANGO_SETTINGS_MODULE'] = 'hub.test_settings'; django.setup()\n"
         if django_setup else "")
        + imports + "\n"
        + "import sys\n"
        + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r} and m not in {SHARED!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])
