"""`hubctl <op>` for every op the hub declares, built from `GET /api/v1/ops`:
flags, types, choices and help come from the op's parameters, so a parameter
added on the server shows up here without a new hubctl. When the hub cannot
be reached (or for `--help` offline), the declarations installed with hubctl
(adapters_ops.opspecs, the same data) stand in.

`transfer` keeps its own command (`--from/--to` fans out over many adapters)
and takes its other flags from the same declaration.
"""

from __future__ import annotations

import argparse
import json
import urllib.request

from hub.cli.client import hub_url

OPS_ROUTE = "/api/v1/ops"
CUSTOM = {"transfer"}  # ops with a command of their own in hub/cli/main.py
FETCH_TIMEOUT = 3.0


def fetch_ops(url: str | None = None) -> list[dict]:
    """The hub's op declarations; the local ones when the hub does not answer them."""
    try:
        with urllib.request.urlopen((url or hub_url()) + OPS_ROUTE, timeout=FETCH_TIMEOUT) as r:
            ops = json.load(r)
        if isinstance(ops, list) and all(isinstance(o, dict) and "name" in o and "params" in o for o in ops):
            return ops
    except (OSError, ValueError):
        pass
    return local_ops()


def local_ops() -> list[dict]:
    from adapters_ops import opspecs

    return [spec.describe() for spec in opspecs.OPS.values() if not spec.test_only]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def subject(op: dict) -> str | None:
    """The param given as the positional argument: the adapter the op acts on, or the ones it reads."""
    return op["writes"] or (op["reads"][0] if op["reads"] else None)


def add_op_parsers(sub, ops: list[dict], wait_flags, func) -> None:
    """One subcommand per op (`func(args)` submits it); `transfer` is left to its own command."""
    for op in ops:
        if op["name"] in CUSTOM:
            continue
        s = sub.add_parser(op["name"], help=f"{op['summary'].rstrip('.')} (a job)", description=op["summary"])
        positional = subject(op)
        for p in op["params"]:
            if p["name"] == positional:
                many = p["type"] == "repos"
                s.add_argument(p["name"], nargs="+" if many else None, metavar="owner/name", help=p["help"])
            else:
                add_param(s, p)
        wait_flags(s)
        s.set_defaults(func=func, op=op)


def add_param(s: argparse.ArgumentParser, p: dict, dest: str | None = None) -> None:
    kwargs: dict = {"dest": dest or p["name"], "help": param_help(p), "required": p["required"]}
    kind = p["type"]
    if kind == "bool":
        kwargs.pop("required")
        s.add_argument(flag(p["name"]), action=argparse.BooleanOptionalAction, default=None, **kwargs)
        return
    if kind == "choice":
        kwargs["choices"] = p["choices"]
        kwargs["type"] = choice_value(p["choices"])
    elif kind in ("int", "float"):
        kwargs["type"] = number_or_word(p)
        kwargs["metavar"] = "|".join(["N" if kind == "int" else "X", *p.get("words", [])])
    elif kind in ("floats", "strs", "repos"):
        kwargs["type"] = comma_list(float if kind == "floats" else str)
        kwargs["metavar"] = "A,B,..."
    elif kind == "object":
        kwargs["type"] = json_object
        kwargs["metavar"] = "JSON"
    elif kind == "repo":
        kwargs["metavar"] = "owner/name"
    s.add_argument(flag(p["name"]), **kwargs)


def param_help(p: dict) -> str:
    text = p["help"]
    bounds = [f">= {_num(p['min'])}" if "min" in p else "", f"<= {_num(p['max'])}" if "max" in p else ""]
    if p["type"] in ("int", "float") and any(bounds):
        text += f" ({' and '.join(b for b in bounds if b)})"
    if "default" in p and p["type"] != "object":
        text += f"; default {json.dumps(p['default'])}"
    return text.replace("%", "%%")  # argparse formats help with %


def choice_value(choices):
    """An argparse type: the declared choice whose text was given (4 for "4", "auto" for "auto")."""
    by_text = {str(c): c for c in choices}

    def parse(text: str):
        if text in by_text:
            return by_text[text]
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(by_text)})")
    parse.__name__ = "choice"
    return parse


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def number_or_word(p: dict):
    """An argparse type: a number within the param's bounds, or one of its words."""
    kind, words = p["type"], p.get("words", [])

    def parse(text: str):
        if text in words:
            return text
        try:
            value = int(text) if kind == "int" else float(text)
        except ValueError:
            value = None
        if value is None or ("min" in p and value < p["min"]) or ("max" in p and value > p["max"]):
            want = "an integer" if kind == "int" else "a number"
            bounds = " and ".join(b for b in (f">= {_num(p['min'])}" if "min" in p else "",
                                               f"<= {_num(p['max'])}" if "max" in p else "") if b)
            alt = "".join(f" or {w}" for w in words)
            raise argparse.ArgumentTypeError(f"expected {want}{' ' + bounds if bounds else ''}{alt}, got {text!r}")
        return value
    parse.__name__ = kind  # argparse names the type in its messages
    return parse


def comma_list(cast):
    def parse(text: str):
        try:
            return [cast(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    parse.__name__ = "list"
    return parse


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"steps\": 500}'")
    return value


def params_of(args, op: dict) -> dict:
    """The job's params from the parsed flags (unset flags left out: the hub's defaults apply).
    Lists are checked against their declared lengths here, so that mistake needs no round trip."""
    params = {p["name"]: getattr(args, p["name"]) for p in op["params"] if getattr(args, p["name"], None) is not None}
    for p in op["params"]:
        value = params.get(p["name"])
        if isinstance(value, list) and not p["min_items"] <= len(value) <= p["max_items"]:
            what = "adapters" if p["type"] == "repos" else "values"
            raise ValueError(f"{op['name']} takes {p['min_items']} to {p['max_items']} {what} for {p['name']}, "
                             f"got {len(value)}.")
    return params


# --- the op table of docs/cli.md (tests/cli/test_op_commands.py keeps it current) ---------------

DOCS_BEGIN, DOCS_END = "<!-- ops:begin (python -m hub.cli.ops docs/cli.md) -->", "<!-- ops:end -->"


def docs_table(ops: list[dict]) -> str:
    """One section per op: its command line, then a row per parameter."""
    out = []
    for op in ops:
        pos = subject(op)
        usage = "transfer --from B1 --to B2 [--adapter owner/name]" if op["name"] in CUSTOM else \
            f"{op['name']} {'owner/name ...' if op['params'] and _is_list(op, pos) else 'owner/name'}"
        out += [f"### `hubctl {usage}`", "", f"{op['summary']} Op `{op['name']}`, queue `{op['queue']}`"
                + (f", makes a `{'` or `'.join(op['produces'])}` revision." if op["produces"] else ", no revision."),
                "", "| flag | type | default | meaning |", "| --- | --- | --- | --- |"]
        for p in op["params"]:
            if p["name"] == pos:
                continue
            kind = "/".join(map(str, p["choices"])) if p["type"] == "choice" else p["type"]
            if p.get("words"):
                kind += "/" + "/".join(p["words"])
            default = "required" if p["required"] else json.dumps(p["default"]) if "default" in p else "—"
            cells = [f"`{flag(p['name'])}`", kind, default, p["help"]]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _is_list(op: dict, name: str | None) -> bool:
    return any(p["name"] == name and p["type"] == "repos" for p in op["params"])


def with_table(text: str, ops: list[dict]) -> str:
    """`text` (docs/cli.md) with the generated table between its markers."""
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    return f"{head}{DOCS_BEGIN}\n{docs_table(ops)}{DOCS_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    doc = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/cli.md")
    doc.write_text(with_table(doc.read_text(), local_ops()))
