"""Fixtures for the Hugging Face-compatible routes: a published adapter, and a
runner that executes real `huggingface_hub` / `peft` client code in a
subprocess pointed at the live test server (HF_ENDPOINT is read at import
time, so a fresh interpreter is the faithful way to set it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def upload_adapter(*, owner, name, base, adapter_dir, user, visibility="public", tags=(), description="",
                   skip=("README.md",)):
    """Publish a PEFT folder through the service layer (what the REST upload calls);
    PEFT's template README is left out so the hub's generated card is served."""
    from hub.registry.services import IncomingFile, adapter_create_from_upload

    paths = [p for p in sorted(adapter_dir.iterdir()) if p.is_file() and p.name not in skip]
    files = [IncomingFile(p.name, open(p, "rb")) for p in paths]
    try:
        return adapter_create_from_upload(
            owner=owner, name=name, base=base, files=files, user=user, visibility=visibility,
            tags=list(tags), description=description,
        )
    finally:
        for f in files:
            f.fileobj.close()


@pytest.fixture(scope="session")
def peft_dir(make_peft_adapter):
    return make_peft_adapter("hf-lora", r=4, seed=1)


@pytest.fixture
def published(user, tiny_base, peft_dir):
    """alice/x: a real PEFT adapter on tiny-base (public), its first revision."""
    return upload_adapter(owner="alice", name="x", base=tiny_base, adapter_dir=peft_dir, user=user,
                          tags=["demo"], description="A demo adapter.")


@pytest.fixture
def hf_client(live_server, tmp_path):
    """run(code, token=None, **env) -> the JSON the code prints on its last stdout line.

    The code runs in a fresh interpreter with HF_ENDPOINT at the live server,
    its own HF_HOME (an empty cache), telemetry off and progress bars off."""
    home = tmp_path / "hf-home"

    def run(code: str, token: str | None = None, timeout: int = 180, **env) -> dict:
        full_env = {
            k: v for k, v in os.environ.items()
            if not k.startswith("HF_") and k not in ("HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE")
        }
        full_env.update(
            HF_ENDPOINT=live_server.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
        )
        if token:
            full_env["HF_TOKEN"] = token
        full_env.update({k: str(v) for k, v in env.items()})
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(f"client failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        return json.loads(lines[-1])

    return run
