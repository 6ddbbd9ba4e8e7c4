"""docs/library.md's examples run: every ```python block, in order, in one namespace, in an empty
folder. A block fenced ```python skip needs a trained base model and is only shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "library.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def runnable_blocks() -> list[str]:
    return BLOCK.findall(DOC.read_text(encoding="utf-8"))


def test_the_page_has_examples_for_every_op():
    code = "\n".join(runnable_blocks())
    for call in ("compeft.compress", "merge.merge", "merge.dare_masks", "merge.dense_updates",
                 "transfer.extract_dense", "transfer.apply_to_state_dict", "qalora.to_qalora"):
        assert call in code, f"docs/library.md has no runnable example of {call}"


def test_library_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "library_doc"}
    for i, block in enumerate(runnable_blocks()):
        try:
            exec(compile(block, f"docs/library.md block {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the block: the traceback alone points into exec
            pytest.fail(f"docs/library.md block {i + 1} failed: {type(exc).__name__}: {exc}\n{block}")
