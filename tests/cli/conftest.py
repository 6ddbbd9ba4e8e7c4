"""Fixtures for `hubctl` tests: the CLI run in-process (`main(argv)` returns the
exit code) against pytest-django's live server, with HUB_URL, HUB_TOKEN and
the token file pointed at the test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    """No token and a private token file, so the developer's own never leaks in."""
    monkeypatch.delenv("HUB_TOKEN", raising=False)
    monkeypatch.delenv("HUB_URL", raising=False)
    monkeypatch.setenv("HUBCTL_CONFIG", str(tmp_path / "hubctl-token"))
    monkeypatch.setenv("HUBCTL_POLL_SECONDS", "0.01")
    return monkeypatch


@pytest.fixture
def hubctl(capsys, cli_env):
    """hubctl(*argv, token=...) -> Run(code, out, err)."""
    from hub.cli.main import main

    def run(*argv, token: str | None = None) -> Run:
        if token is None:
            cli_env.delenv("HUB_TOKEN", raising=False)
        else:
            cli_env.setenv("HUB_TOKEN", token)
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


@pytest.fixture
def hub(live_server, cli_env):
    """The live server's URL in HUB_URL."""
    cli_env.setenv("HUB_URL", live_server.url)
    return live_server.url


@pytest.fixture(scope="session")
def cli_adapter_dir(make_peft_adapter) -> Path:
    """One real PEFT folder (r=4 on q_proj, v_proj) for every CLI test."""
    return make_peft_adapter("cli-lora", r=4, targets=("q_proj", "v_proj"))
