"""`hubctl pull` moves several files at once (hub/cli/files.py), still byte-identical."""

from __future__ import annotations

import threading
import time

from tests.cli.test_cli import adapter_dir, live, pushed, registered, seeds_file, tokens  # noqa: F401 - fixtures


@live
def test_pull_downloads_files_in_parallel(pushed, hubctl, adapter_dir, tmp_path, monkeypatch):  # noqa: F811
    import httpx

    lock, state = threading.Lock(), {"now": 0, "most": 0}

    class Counting(httpx.Client):
        def send(self, request, **kwargs):
            if "/files/" not in request.url.path:
                return super().send(request, **kwargs)
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            try:
                time.sleep(0.5)  # long enough for the other files' requests to start meanwhile
                return super().send(request, **kwargs)
            finally:
                with lock:
                    state["now"] -= 1

    monkeypatch.setattr("hub.cli.client.httpx.Client", Counting)
    out = tmp_path / "pulled"
    r = hubctl("pull", "alice/skill", "-o", out)
    assert r.code == 0, r.err
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (adapter_dir / name).read_bytes()
    assert state["most"] >= 2


@live
def test_pull_one_file_at_a_time_when_asked(pushed, hubctl, adapter_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr("hub.cli.files.PARALLEL_FILES", 1)
    r = hubctl("pull", "alice/skill", "-o", tmp_path / "serial")
    assert r.code == 0, r.err
    assert (tmp_path / "serial" / "adapter_model.safetensors").read_bytes() == \
        (adapter_dir / "adapter_model.safetensors").read_bytes()


@live
def test_pull_reads_the_socket_in_large_pieces(pushed, hubctl, adapter_dir, tmp_path, monkeypatch):  # noqa: F811
    """hubctl asks httpcore for 1 MiB per read, not its 64 KiB (a trip through h11's parser each)."""
    from httpcore._backends.sync import SyncStream

    asked: list[int] = []
    real_read = SyncStream.read

    def read(self, max_bytes, timeout=None):
        asked.append(max_bytes)
        return real_read(self, max_bytes, timeout)

    monkeypatch.setattr(SyncStream, "read", read)
    r = hubctl("pull", "alice/skill", "-o", tmp_path / "large")
    assert r.code == 0, r.err
    assert asked and min(asked) >= 1024 * 1024, sorted(set(asked))
