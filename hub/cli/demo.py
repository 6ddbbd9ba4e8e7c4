"""`hubctl demo path [--wait SECONDS]`: the folder of the demo zoo that the local
`hubctl serve` registered (tiny base models, tasks/<skill>/{train,seed,test}.jsonl,
adapters/<skill>/), read from HUB_HOME/demo-status.json, so the README's tour can
push and use real files. With --wait it waits until serve has registered the demo
(the first start builds it) and fails with serve's reason when the demo failed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hub import demo_status
from hub.cli.client import UserError


def hub_home() -> Path:
    return Path(os.environ.get("HUB_HOME") or "var").expanduser().resolve()


def cmd_path(args) -> int:
    from hub.cli import main  # the output helpers; imported late, main imports this module

    home = hub_home()
    deadline = time.monotonic() + max(args.wait, 0)
    said = None
    while True:
        status = demo_status.read(home) or {}
        state = status.get("state")
        if state == "ready" and status.get("zoo"):
            main.out(status["zoo"])
            return 0
        if state == "failed":
            raise UserError(f"The demo failed: {status.get('detail')} (see `hubctl serve`'s output).")
        if time.monotonic() >= deadline:
            if args.wait > 0:
                raise UserError(f"No demo in {home} after {args.wait:g}s: {status.get('detail') or 'no demo yet'} "
                                "(is `hubctl serve` running without --no-demo, with this HUB_HOME?).")
            raise UserError(f"No demo registered in {home} yet ({status.get('detail') or 'no demo status'}): "
                            "start `hubctl serve` (without --no-demo), or pass --wait SECONDS.")
        if state != said:  # one note per state, on stderr: stdout stays the path alone
            main.note(f"waiting for the demo in {home}: {status.get('detail') or 'the hub is starting'}")
            said = state
        time.sleep(1.0)


def add_parsers(sub) -> None:
    demo = sub.add_parser("demo", help="the demo zoo of the local `hubctl serve` (HUB_HOME)")
    dsub = demo.add_subparsers(dest="demo_command", metavar="ACTION", required=True, parser_class=type(demo))
    s = dsub.add_parser("path", help="print the demo zoo's folder (its adapters, tasks and bases)")
    s.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to SECONDS until serve has registered the demo (0: do not wait)")
    s.set_defaults(func=cmd_path)
