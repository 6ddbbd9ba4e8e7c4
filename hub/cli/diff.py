"""`hubctl diff extract|apply`: fine-tuning diffs of full checkpoints, on this
machine (the tensor library streams them tensor by tensor; memory stays near
one tensor). A base may be a local HF folder or the slug of a base model
registered on the hub, which is downloaded once into ~/.cache/hubctl/bases."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hub.cli.client import API, Client, ServerError, UserError


def out(text: str) -> None:
    print(text, flush=True)


def _library():
    try:  # torch lives on the client only for these commands
        from adapters_ops import transfer
        from adapters_ops.errors import AdapterError
    except ImportError as exc:
        raise UserError(f"hubctl diff runs on this machine and needs the tensor library (torch): {exc}.") from None
    return transfer, AdapterError


def resolve_base(ref: str) -> Path:
    """A local folder as it is, else a registered base's files (cached by its commit id)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if "/" in ref or ref.startswith("."):
        raise UserError(f"{ref} is not a folder (and not a registered base slug).")
    with Client() as c:
        base = c.get(f"{API}/base-models/{ref}/")
        dest = Path.home() / ".cache" / "hubctl" / "bases" / f"{base['slug']}-{base['sha'][:16]}"
        if not (dest / ".complete").exists():
            dest.mkdir(parents=True, exist_ok=True)
            for f in base["files"]:
                _download(c, f"{API}/base-models/{base['slug']}/files/{f['path']}", dest / f["path"], f["sha256"])
            (dest / ".complete").write_text(base["sha"])
    return dest


def _download(c: Client, url: str, dest: Path, sha256: str) -> None:
    part, h = dest.with_name(dest.name + ".incomplete"), hashlib.sha256()
    with c.stream("GET", url) as r, open(part, "wb") as f:
        for chunk in r.iter_bytes(1 << 20):
            f.write(chunk)
            h.update(chunk)
    if h.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise ServerError(f"{dest.name}: sha256 mismatch after download.")
    os.replace(part, dest)


def _progress(label: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
    task = bar.add_task("", total=1.0)
    return bar, lambda f, msg="": bar.update(task, completed=f, description=str(msg)[:60])


def cmd_diff_extract(args) -> int:
    transfer, AdapterError = _library()
    finetuned, base = resolve_base(args.finetuned), resolve_base(args.base)
    dest = Path(args.output).expanduser()
    bar, progress = _progress("extract")
    try:
        with bar:
            if args.dense:
                report = transfer.extract_dense(finetuned, base, dest / "diff.safetensors", progress=progress)
            else:
                _, rep = transfer.extract(finetuned, base, args.rank, out_dir=dest, progress=progress)
                report = rep.as_dict()
    except AdapterError as exc:
        raise UserError(str(exc)) from None
    what = "dense diff" if args.dense else f"rank-{args.rank} LoRA-form diff"
    energy = "" if args.dense else f", captured energy {report.get('energy', report.get('overall_energy', '?'))}"
    out(f"Wrote the {what} of {args.finetuned} against {args.base} into {dest}{energy}.")
    return 0


def cmd_diff_apply(args) -> int:
    transfer, AdapterError = _library()
    diff = Path(args.diff).expanduser()
    if not diff.exists():
        raise UserError(f"{diff} does not exist: pass a folder from `hubctl diff extract` or a diff .safetensors.")
    target = resolve_base(args.target)
    dest = Path(args.output).expanduser()
    bar, progress = _progress("apply")
    try:
        with bar:
            transfer.apply(diff, target, dest, scale=args.scale, progress=progress)
    except AdapterError as exc:
        raise UserError(str(exc)) from None
    out(f"Wrote {args.target} + {args.scale:g} x diff as a checkpoint into {dest}.")
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("diff", help="fine-tuning diffs of full checkpoints (runs here)")
    dsub = d.add_subparsers(dest="diff_cmd", required=True)
    s = dsub.add_parser("extract", help="FINETUNED - BASE, as a low-rank LoRA-form diff or a dense file")
    s.add_argument("finetuned", help="HF folder of the fine-tuned model, or a registered base slug")
    s.add_argument("base", help="HF folder of its base, or a registered base slug")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.add_argument("--rank", type=int, default=64, help="rank of the LoRA-form diff (default 64)")
    s.add_argument("--dense", action="store_true", help="keep the exact dense diff instead")
    s.set_defaults(func=cmd_diff_extract)
    s = dsub.add_parser("apply", help="TARGET + scale x DIFF, written as a new checkpoint")
    s.add_argument("diff", help="a folder from `hubctl diff extract`, or a dense diff .safetensors")
    s.add_argument("target", help="HF folder of the new base, or a registered base slug")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.add_argument("--scale", type=float, default=1.0)
    s.set_defaults(func=cmd_diff_apply)
