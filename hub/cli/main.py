"""`hubctl`: the command line of the adapter hub, an HTTP client of /api/v1/.

Exit codes: 0 ok, 1 user error (bad input, a refused request, a failed job),
2 server error or server unreachable. Failures print one line on stderr.
See docs/cli.md for every command with an example.
"""

from __future__ import annotations

import argparse
import getpass
import os
import platform
import sys

from hub.cli import adapters, bases, demo, diff, jobs, ops, webhook
from hub.cli.client import (
    API,
    Client,
    CliError,
    UserError,
    hub_url,
    store_token,
)
from hub.cli.output import (
    dump_json,
    note,
    out,
)


def cmd_login(args) -> int:
    token = args.token
    if not token:
        if sys.stdin.isatty():
            token = getpass.getpass(f"API token for {hub_url()}: ")
        else:
            token = sys.stdin.readline()
    token = (token or "").strip()
    if not token:
        raise UserError("No token given. Pass --token, or type it at the prompt (`python manage.py hubtoken USER`).")
    with Client(token=token) as c:
        me = c.get(f"{API}/me")
        if args.expires:  # store a new token of that lifetime, minted with the one given
            new = c.post(f"{API}/tokens/", {"name": f"hubctl login ({platform.node() or 'host'})"[:64],
                                            "expires": args.expires})
            token = new["token"]
    path = store_token(token)
    out(f"Logged in to {c.url} as {me['username']}. Token stored in {path}.")
    if args.expires:
        out(f"The stored token expires at {new['expires_at']}; the token you gave stays valid until you revoke it.")
    if os.environ.get("HUB_TOKEN") and os.environ["HUB_TOKEN"] != token:
        note("note: HUB_TOKEN is set in the environment and takes precedence over the stored token.")
    return 0


def cmd_whoami(args) -> int:
    with Client() as c:
        me = c.get(f"{API}/me")
    if args.json:
        dump_json(me)
        return 0
    orgs = ", ".join(me.get("orgs") or []) or "-"
    out(f"{me['username']} on {c.url} (orgs: {orgs}{'; staff' if me.get('is_staff') else ''})")
    return 0


def cmd_serve(args) -> int:
    from hub.cli import serve

    return serve.serve(args)


class Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors: exit 1, not argparse's 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser(op_specs: list[dict] | None = None) -> Parser:
    """`op_specs`: the hub's op declarations (`GET /api/v1/ops`); default the ones installed here."""
    p = Parser(prog="hubctl", description="Command line of the adapter hub (HUB_URL, HUB_TOKEN; see docs/cli.md).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    as_json = Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON")

    s = sub.add_parser("serve", help="run the hub with its workers on embedded defaults")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--no-demo", action="store_true", help="do not build and register the demo zoo")
    s.add_argument("--demo", choices=("tiny", "real"), default="tiny",
                   help="real: also the SmolLM2-135M lane (bases 1.0 and 1.1, four LoRAs; built once, ~45 min)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="Celery worker concurrency (0: start no worker and no beat)")
    s.add_argument("--web-workers", type=int, default=2, metavar="N", help="gunicorn processes (8 threads each)")
    s.add_argument("--redis-port", type=int, default=6390, help="port of the embedded Redis (no REDIS_URL set)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("login", help="store an API token (verified with the hub)")
    s.add_argument("--token", help="the token (default: read from stdin or a prompt)")
    s.add_argument("--expires", metavar="LIFETIME",
                   help="store a new token that expires after LIFETIME (30d, 12h, 90m) instead of the one given")
    s.set_defaults(func=cmd_login)
    s = sub.add_parser("whoami", help="who the token belongs to", parents=[as_json])
    s.set_defaults(func=cmd_whoami)

    base = sub.add_parser("base", help="base models: add, list, show, deprecate")
    bsub = base.add_subparsers(dest="base_command", metavar="ACTION", parser_class=Parser, required=True)
    s = bsub.add_parser("add", help="register a base model from its HF-layout folder (staff)")
    s.add_argument("slug")
    s.add_argument("--weights", required=True, metavar="DIR", help="folder with config.json and *.safetensors")
    s.add_argument("--family")
    s.add_argument("--version")
    s.add_argument("--description")
    s.set_defaults(func=bases.cmd_base_add)
    s = bsub.add_parser("list", help="list base models", parents=[as_json])
    s.add_argument("--status", choices=["active", "deprecated", "retired"])
    s.add_argument("--family")
    s.set_defaults(func=bases.cmd_base_list)
    s = bsub.add_parser("show", help="one base model", parents=[as_json])
    s.add_argument("slug")
    s.set_defaults(func=bases.cmd_base_show)
    s = bsub.add_parser("deprecate", help="deprecate a base model in favour of a successor (staff)")
    s.add_argument("slug")
    s.add_argument("--successor", required=True)
    s.add_argument("--at", help="when (ISO date or date-time, UTC); default now")
    s.set_defaults(func=bases.cmd_base_deprecate)

    s = sub.add_parser("push", help="upload a PEFT adapter folder as owner/name")
    s.add_argument("dir")
    s.add_argument("--base", required=True, help="base model slug")
    s.add_argument("--name", required=True, help="owner/name")
    s.add_argument("--private", action="store_true")
    s.add_argument("--seeds", metavar="FILE", help="JSONL of {prompt, completion} seed examples")
    s.add_argument("--tags", help="comma-separated tags")
    s.add_argument("--card", metavar="README.md", help="model card (markdown); default: the folder's README.md")
    s.add_argument("--qalora-group-size", type=int, metavar="G",
                   help="the adapter is a QA-LoRA trained with the qa-lora repository (lora_A has in/G columns, "
                        "group mean pooling): declare it in the uploaded adapter_config.json")
    s.set_defaults(func=adapters.cmd_push)

    s = sub.add_parser("pull", help="download an adapter revision into a folder")
    s.add_argument("repo", metavar="owner/name")
    s.add_argument("--revision", help="ref name or commit (default main; compeft with --compressed)")
    s.add_argument("--compressed", action="store_true", help="download the ComPEFT file and decode it here")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.set_defaults(func=adapters.cmd_pull)

    s = sub.add_parser("adapters", help="list adapters", parents=[as_json])
    s.add_argument("--base")
    s.add_argument("--q")
    s.add_argument("--tag")
    s.add_argument("--owner")
    s.add_argument("--kind", help="only adapters with a revision of this kind")
    s.set_defaults(func=adapters.cmd_adapters)
    s = sub.add_parser("revisions", help="revisions of an adapter", parents=[as_json])
    s.add_argument("repo", metavar="owner/name")
    s.set_defaults(func=adapters.cmd_revisions)
    s = sub.add_parser("lineage", help="lineage tree of an adapter", parents=[as_json])
    s.add_argument("repo", metavar="owner/name")
    s.set_defaults(func=adapters.cmd_lineage)

    s = sub.add_parser("jobs", help="list jobs, show or watch one, or `jobs cancel ID`", parents=[as_json])
    s.add_argument("args", nargs="*", metavar="ID | cancel ID")
    s.add_argument("--watch", action="store_true", help="follow the job until it finishes")
    s.add_argument("--status", help="filter the list by status")
    s.add_argument("--op", help="filter the list by op")
    s.set_defaults(func=jobs.cmd_jobs)

    def wait_flags(s):
        s.add_argument("--wait", "--watch", dest="wait", action="store_true", help="follow the job until it finishes")
        s.add_argument("--require-pass", action="store_true",
                       help="with --wait: exit 1 unless the result's quality verdict is passed (docs/jobs.md)")

    s = sub.add_parser("transfer", help="move adapters from one base model to another (jobs)")
    s.add_argument("--from", dest="source", required=True, metavar="BASE")
    s.add_argument("--to", dest="target", required=True, metavar="BASE")
    s.add_argument("--adapter", metavar="owner/name", help="one adapter (default: every one you may write)")
    s.add_argument("--method", choices=["diff", "translora", "auto"])
    s.add_argument("--finetune-steps", type=int)
    s.add_argument("--name", metavar="owner/name", help="name of the new adapter (with --adapter)")
    wait_flags(s)
    s.set_defaults(func=jobs.cmd_transfer)

    ops.add_op_parsers(sub, ops.local_ops() if op_specs is None else op_specs, wait_flags, jobs.cmd_op)
    diff.add_parsers(sub)
    webhook.add_parsers(sub, as_json)
    demo.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # An op command takes its flags from the hub's own declarations; other commands need no round trip.
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(ops.fetch_ops() if first and first not in static_commands() else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (1)
        return exc.code if isinstance(exc.code, int) else 1
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 1
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"hubctl: error: {exc.message}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hubctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hubctl ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # a local file problem (a missing folder, a full disk)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"hubctl: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def static_commands() -> set[str]:
    """hubctl's own commands (the rest are ops)."""
    sub = next(a for a in build_parser([])._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


if __name__ == "__main__":
    sys.exit(main())
