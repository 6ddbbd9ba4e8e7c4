"""`hubctl webhook add|list|rm|ping|deliveries|rotate|enable|disable`: an
owner's webhooks (docs/webhooks.md). The secret is printed once, by `add`
and `rotate`: store it where the receiver verifies signatures."""

from __future__ import annotations

from hub.cli import output
from hub.cli.client import API, Client, UserError


def _path(hook_id: str, tail: str = "") -> str:
    # isdigit() passes "¹" and isdecimal() "٣": neither is an id the server knows.
    if not (hook_id.isascii() and hook_id.isdecimal()):
        raise UserError(f"{hook_id!r} is not a webhook id (a number; see `hubctl webhook list`).")
    return f"{API}/webhooks/{hook_id}/{tail}"


def _show_secret(hook: dict) -> None:
    output.out(f"Webhook {hook['id']} ({hook['owner']} -> {hook['url']}; events {', '.join(hook['events'])}).")
    output.out(f"secret: {hook['secret']}")
    output.note("The secret is shown only now: the receiver verifies each delivery's signature with it.")


def cmd_add(args) -> int:
    body = {"url": args.url, "owner": args.owner, "description": args.description,
            "events": args.events.split(",") if args.events else None}
    with Client() as c:
        hook = c.post(f"{API}/webhooks/", {k: v for k, v in body.items() if v is not None})
    if args.json:
        output.dump_json(hook)
    else:
        _show_secret(hook)
    return 0


def cmd_list(args) -> int:
    with Client() as c:
        hooks = list(c.paginate(f"{API}/webhooks/"))
    return output.listing(hooks, args.json, "No webhooks. Add one with: hubctl webhook add URL",
                       ["id", "owner", "url", "events", "active", "created"],
                       lambda h: [h["id"], h["owner"], h["url"], ",".join(h["events"]), "yes" if h["active"] else "no",
                                  output.short_time(h["created_at"])])


def cmd_rm(args) -> int:
    with Client() as c:
        c.json("DELETE", _path(args.id))
    output.out(f"Webhook {args.id} deleted.")
    return 0


def cmd_set_active(args) -> int:
    with Client() as c:
        hook = c.json("PATCH", _path(args.id), json={"active": args.active})
    output.out(f"Webhook {hook['id']} {'enabled' if hook['active'] else 'disabled'}.")
    return 0


def cmd_rotate(args) -> int:
    with Client() as c:
        _show_secret(c.post(_path(args.id, "rotate-secret")))
    return 0


def cmd_ping(args) -> int:
    with Client() as c:
        d = c.post(_path(args.id, "ping"))
    output.out(f"Ping queued as delivery {d['id']}; see `hubctl webhook deliveries {args.id}`.")
    return 0


def cmd_deliveries(args) -> int:
    with Client() as c:
        rows = list(c.paginate(_path(args.id, "deliveries")))
    return output.listing(rows, args.json, "No deliveries yet.",
                       ["id", "event", "status", "attempts", "http", "error", "created"],
                       lambda d: [d["id"], d["event"], d["status"], d["attempts"], d.get("response_status") or "",
                                  output.last_line(d.get("error") or ""), output.short_time(d["created_at"])])


def add_parsers(sub, as_json) -> None:
    hook = sub.add_parser("webhook", help="webhooks: add, list, rm, ping, deliveries, rotate, enable, disable")
    wsub = hook.add_subparsers(dest="webhook_command", metavar="ACTION", required=True, parser_class=type(hook))
    s = wsub.add_parser("add", help="POST events about your adapters to URL", parents=[as_json])
    s.add_argument("url")
    s.add_argument("--owner", help="a namespace you can write (default: you)")
    s.add_argument("--events", help="comma-separated: adapter.moved,adapter.move_failed,job.finished (default: all)")
    s.add_argument("--description")
    s.set_defaults(func=cmd_add)
    s = wsub.add_parser("list", help="your webhooks", parents=[as_json])
    s.set_defaults(func=cmd_list)
    for name, func, text in (("rm", cmd_rm, "delete a webhook"), ("ping", cmd_ping, "send a test event"),
                             ("rotate", cmd_rotate, "replace the signing secret (printed once)")):
        s = wsub.add_parser(name, help=text)
        s.add_argument("id")
        s.set_defaults(func=func)
    for name, active in (("enable", True), ("disable", False)):
        s = wsub.add_parser(name, help=f"{name} a webhook")
        s.add_argument("id")
        s.set_defaults(func=cmd_set_active, active=active)
    s = wsub.add_parser("deliveries", help="what was sent to a webhook, and how it went", parents=[as_json])
    s.add_argument("id")
    s.set_defaults(func=cmd_deliveries)
