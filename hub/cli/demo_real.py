"""`hubctl serve --demo real`: the zoo's real lane (SmolLM2-135M-Instruct 1.0 and our 1.1,
four real-language LoRAs with seeds) registered in the hub, so `hubctl transfer --from
smollm2-135m-1.0 --to smollm2-135m-1.1` runs on a real LM.

The lane lives in the user's cache (`python -m adapters_ops.zoo path --lane real`), shared by
every HUB_HOME. When it is not built yet, the build (~45 min on two cores) runs as a
supervised child while the hub already answers; registration follows when it ends. Both the
build and `seed_demo` skip what is already done. torch stays out of this process: the
adapters_ops calls are subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ZOO_STAMP = ".zoo-stamp"  # adapters_ops.zoo.STAMP
BASE, SUCCESSOR = "smollm2-135m-1.0", "smollm2-135m-1.1"


def real_lane_dir(env: dict, cwd: Path) -> Path | None:
    proc = subprocess.run([sys.executable, "-m", "adapters_ops.zoo", "path", "--lane", "real", "--no-build"],
                          env=env, cwd=cwd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return Path(lines[-1]) if proc.returncode == 0 and lines else None


def seed_real_demo(home: Path, env: dict, sup, say, project_root: Path) -> None:
    from django.core.management import call_command

    from hub.cli.serve import _Prefixed

    lane = real_lane_dir(env, project_root)
    if lane is None:
        say("real demo skipped: `python -m adapters_ops.zoo path --lane real` failed")
        return
    if not (lane / ZOO_STAMP).is_file():
        say(f"building the real lane in {lane} (SmolLM2-135M, once; ~45 min on 2 cores; the hub already answers)")
        t0 = time.monotonic()
        build = sup.start("zoo-real", [sys.executable, "-m", "adapters_ops.zoo", "build", str(lane), "--lane", "real"],
                          env, project_root)
        while build.alive() and not sup.stop_requested.wait(0.5):
            pass
        if sup.stop_requested.is_set():
            return
        sup.forget(build)
        if build.proc.returncode != 0:
            say(f"real demo skipped: the build failed (exit {build.proc.returncode}, see the zoo-real lines above)")
            return
        say(f"real lane built in {time.monotonic() - t0:.0f}s")
    t0 = time.monotonic()
    call_command("seed_demo", str(lane), user="admin", base=BASE, successor=SUCCESSOR, stdout=_Prefixed("demo-real"))
    say(f"real lane registered in {time.monotonic() - t0:.1f}s")
