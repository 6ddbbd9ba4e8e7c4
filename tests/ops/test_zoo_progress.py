"""The zoo build reports progress from its start (serve shows these lines while the
demo builds): a first line before any work, one per base and adapter before its
training, and step lines from the ticker while a long training runs."""

from __future__ import annotations

import dataclasses

from adapters_ops import zoo


def test_ticker_logs_at_most_every_interval_and_not_the_last_step(monkeypatch):
    clock = iter([0.0, 5.0, 10.5, 12.0, 30.0, 31.0])
    monkeypatch.setattr(zoo.time, "perf_counter", lambda: next(clock))
    lines = []
    tick = zoo._Ticker(lines.append, "base b", steps=5, every=10.0)  # t0 = 0
    for step in range(1, 6):  # at 5 s, 10.5 s, 12 s, 30 s, 31 s
        tick(step, 0.5)
    assert lines == ["base b: step 2/5, loss 0.500, 10 s", "base b: step 4/5, loss 0.500, 30 s"]


def test_build_says_what_it_does_before_doing_it(tmp_path):
    tiny = dataclasses.replace(zoo.TINY, bases=tuple(dataclasses.replace(b, steps=2, docs=64) for b in zoo.TINY.bases),
                               skills=("caesar",), lora_steps=2)
    lines = []
    zoo.build(tmp_path / "z", recipe=tiny, log=lines.append)
    assert lines[0].startswith(f"building {tmp_path / 'z'} (recipe tiny") and "4 bases, 1 skill adapters" in lines[0]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("base tiny-llama-3.0: training 2 steps")]
    done = [i for i, ln in enumerate(lines) if ln.startswith("base tiny-llama-3.0: 2 steps, loss")]
    assert starts and done and starts[0] < done[0]
    assert any(ln.startswith("adapter caesar: training 2 steps") for ln in lines)
