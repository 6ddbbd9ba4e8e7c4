"""Where a run keeps each finished stage's output (memory, a folder, or the worker's blob
store), and how each output is written and read back with the run's fingerprint."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..adapter import Adapter

# --- checkpoint stores -------------------------------------------------------------------------


class Checkpoint(Protocol):
    def load(self, stage: str) -> bytes | None: ...

    def save(self, stage: str, data: bytes) -> None: ...


class MemoryCheckpoint:
    """Stage outputs in a dict (tests; a worker keeps them in the blob store)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def load(self, stage: str) -> bytes | None:
        return self.data.get(stage)

    def save(self, stage: str, data: bytes) -> None:
        self.data[stage] = bytes(data)


class DirCheckpoint:
    """Stage outputs as files `<dir>/<stage>.ckpt`, written atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self, stage: str) -> bytes | None:
        f = self.path / f"{stage}.ckpt"
        return f.read_bytes() if f.is_file() else None

    def save(self, stage: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{stage}.ckpt.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path / f"{stage}.ckpt")


def _jsonl_bytes(fingerprint: str, info: dict, rows: Sequence[dict]) -> bytes:
    head = json.dumps({"fingerprint": fingerprint, "info": info}, sort_keys=True)
    return "".join([head + "\n"] + [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows]).encode()


def _jsonl_parse(data: bytes) -> tuple[str, dict, list[dict]]:
    lines = data.decode("utf-8").splitlines()
    head = json.loads(lines[0])
    return head["fingerprint"], head["info"], [json.loads(x) for x in lines[1:] if x.strip()]


def _adapter_bytes(adapter: Adapter, fingerprint: str, info: dict) -> bytes:
    from safetensors.torch import save

    meta = {"fingerprint": fingerprint, "adapter_config": json.dumps(adapter.config, sort_keys=True),
            "info": json.dumps(info, sort_keys=True)}
    return save({k: v.contiguous() for k, v in adapter.tensors.items()}, metadata=meta)


def _adapter_parse(data: bytes) -> tuple[str, dict, Adapter]:
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    adapter = Adapter(config=json.loads(meta["adapter_config"]), tensors=load(data))
    return meta["fingerprint"], json.loads(meta["info"]), adapter


# Each stage's (dump(fingerprint, info, value) -> bytes, parse(bytes) -> (fingerprint, info, value)).
_JSONL = (_jsonl_bytes, _jsonl_parse)
_ADAPTER = (lambda fp, info, adapter: _adapter_bytes(adapter, fp, info), _adapter_parse)
_METRICS = (lambda fp, metrics, _: json.dumps({"fingerprint": fp, "metrics": metrics}).encode(),
            lambda data: (json.loads(data)["fingerprint"], json.loads(data)["metrics"], None))
