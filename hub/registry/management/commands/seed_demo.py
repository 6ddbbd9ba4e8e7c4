"""`python manage.py seed_demo ZOO_DIR`: register the tiny demo zoo.

Reads the layout that `python -m adapters_ops.zoo build ZOO_DIR` writes
(files only, no torch):

    ZOO_DIR/bases/<slug>/          HF layout (config.json, *.safetensors, tokenizer)
    ZOO_DIR/adapters/<skill>/      PEFT folders trained on tiny-llama-3.0
    ZOO_DIR/tasks/<skill>/seed.jsonl
    ZOO_DIR/manifest.json          optional: {"bases": [{slug, family, version}],
                                   "skills": [{name, description}], "adapters": [{skill, base}]}

Registers every base, deprecates tiny-llama-3.0 in favour of tiny-llama-3.1
(effective in 30 days), and uploads each skill as `demo/<skill>` with its seed
split and a short model card. Idempotent: what exists already is left alone.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from hub.registry import services
from hub.registry.models import Adapter, BaseModel, Membership, Org
from hub.registry.validation import ValidationError


def guess_family_version(slug: str) -> tuple[str, str]:
    head, _, tail = slug.rpartition("-")
    return (head, tail) if head and tail[:1].isdigit() else (slug, "")


def entry(manifest: dict, section: str, key: str, value: str) -> dict:
    """The manifest's record of one base, skill or adapter ({} when it has none)."""
    items = manifest.get(section)
    if not isinstance(items, list):
        return {}
    return next((e for e in items if isinstance(e, dict) and e.get(key) == value), {})


def top_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def model_card(repo: str, skill: str, base: str, config: dict, seeds: Path | None, note: str = "") -> str:
    targets = config.get("target_modules") or []
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
    lines = [
        f"# {repo}",
        "",
        f"A LoRA adapter for the `{skill}` task of the demo model family, trained on `{base}`.",
        "It is part of the hub's demo: try `hubctl pull`, `hubctl compress` or `hubctl transfer` on it.",
    ]
    if note:
        lines += ["", note]
    lines += ["", f"- rank r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, target modules: {targets}"]
    example = None
    if seeds is not None:
        rows = [ln for ln in seeds.read_text(encoding="utf-8").split("\n") if ln.strip()]
        lines.append(f"- seed examples: {len(rows)} prompt/completion pairs (Trans-LoRA and evaluations use them)")
        try:
            example = json.loads(rows[0]) if rows else None
        except ValueError:
            example = None
    if isinstance(example, dict) and "prompt" in example:
        lines += ["", "Example:", "", "```", f"{example['prompt']}{example.get('completion', '')}", "```"]
    return "\n".join(lines) + "\n"


class Command(BaseCommand):
    help = "Register the demo zoo (bases, a deprecation, demo/<skill> adapters with seeds). Idempotent."

    def add_arguments(self, parser):
        parser.add_argument("zoo_dir")
        parser.add_argument("--user", default="admin", help="who registers and uploads (created as staff if missing)")
        parser.add_argument("--owner", default="demo", help="namespace of the demo adapters (an org)")
        parser.add_argument("--base", default="tiny-llama-3.0", help="base of the zoo's adapters")
        parser.add_argument("--successor", default="tiny-llama-3.1", help="successor of --base")
        parser.add_argument("--deprecate-in-days", type=int, default=30)

    def handle(self, zoo_dir, user, owner, base, successor, deprecate_in_days, **options):
        zoo = Path(zoo_dir)
        if not (zoo / "bases").is_dir():
            raise CommandError(f"{zoo} has no bases/ folder: build it with `python -m adapters_ops.zoo build {zoo}`.")
        manifest = {}
        if (zoo / "manifest.json").is_file():
            try:
                manifest = json.loads((zoo / "manifest.json").read_text())
            except ValueError as exc:
                raise CommandError(f"{zoo}/manifest.json is not JSON: {exc}") from None
        account = self.ensure_user(user)
        self.ensure_namespace(owner, account)
        for folder in sorted(p for p in (zoo / "bases").iterdir() if p.is_dir()):
            self.register_base(folder, account, entry(manifest, "bases", "slug", folder.name))
        self.deprecate(base, successor, deprecate_in_days)
        adapters_dir = zoo / "adapters"
        if adapters_dir.is_dir():
            for folder in sorted(p for p in adapters_dir.iterdir() if p.is_dir()):
                self.upload_adapter(zoo, folder, owner, base, account, manifest)

    # --- steps --------------------------------------------------------------------------------

    def ensure_user(self, username: str):
        User = get_user_model()
        account, created = User.objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            account.set_unusable_password()
            account.save()
        elif not account.is_staff:
            account.is_staff = True
            account.save(update_fields=["is_staff"])
        return account

    def ensure_namespace(self, owner: str, account) -> None:
        if owner == account.username:
            return
        if get_user_model().objects.filter(username=owner).exists():
            raise CommandError(f"'{owner}' is a user name; pick another --owner for the demo adapters.")
        org, _ = Org.objects.get_or_create(name=owner)
        Membership.objects.get_or_create(org=org, user=account, defaults={"role": "admin"})

    def register_base(self, folder: Path, account, info: dict) -> None:
        slug = folder.name
        if BaseModel.objects.filter(slug=slug).exists():
            self.stdout.write(f"base {slug}: present")
            return
        family, version = guess_family_version(slug)
        family, version = str(info.get("family") or family), str(info.get("version") or version)
        with ExitStack() as stack:
            files = [services.IncomingFile(p.name, stack.enter_context(open(p, "rb"))) for p in top_files(folder)]
            try:
                services.base_model_register(
                    slug=slug, files=files, user=account, family=family, version=version,
                    description=str(info.get("description") or
                                    f"Tiny demo base model `{slug}`, from the hub's own model family (adapters_ops.zoo)."),
                )
            except (ValidationError, services.Conflict) as exc:
                raise CommandError(f"base {slug}: {exc}") from None
        self.stdout.write(f"base {slug}: registered")

    def deprecate(self, slug: str, successor: str, days: int) -> None:
        base = BaseModel.objects.filter(slug=slug).first()
        succ = BaseModel.objects.filter(slug=successor).first()
        if base is None or succ is None:
            self.stdout.write(f"deprecation skipped: {slug} or {successor} is not registered")
            return
        if base.status != "active":
            self.stdout.write(f"base {slug}: already {base.status}")
            return
        services.base_model_deprecate(base=base, successor=succ, at=timezone.now() + timedelta(days=days))
        self.stdout.write(f"base {slug}: deprecated in favour of {successor} (in {days} days)")

    def upload_adapter(self, zoo: Path, folder: Path, owner: str, default_base: str, account, manifest: dict) -> None:
        skill = folder.name
        repo = f"{owner}/{skill}"
        if Adapter.objects.filter(owner=owner, name=skill).exists():
            self.stdout.write(f"adapter {repo}: present")
            return
        info = entry(manifest, "adapters", "skill", skill)
        base_slug = info["base"] if isinstance(info.get("base"), str) else default_base
        base = BaseModel.objects.filter(slug=base_slug).first()
        if base is None:
            raise CommandError(f"adapter {repo}: base model {base_slug} is not registered.")
        cfg_path = folder / "adapter_config.json"
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CommandError(f"adapter {repo}: cannot read {cfg_path}: {exc}") from None
        seeds_path = zoo / "tasks" / skill / "seed.jsonl"
        seeds_path = seeds_path if seeds_path.is_file() else None
        described = entry(manifest, "skills", "name", skill).get("description")
        note = f"The task: {described}." if isinstance(described, str) and described else ""
        card = model_card(repo, skill, base_slug, config, seeds_path, note)
        with ExitStack() as stack:
            # PEFT's template README is left out: the hub serves a card built from
            # the description, with the model-tree front matter (hub/hfcompat/card.py).
            files = [services.IncomingFile(p.name, stack.enter_context(open(p, "rb")))
                     for p in top_files(folder) if p.name != "README.md"]
            seeds = (services.IncomingFile(seeds_path.name, stack.enter_context(open(seeds_path, "rb")))
                     if seeds_path else None)
            try:
                rev = services.adapter_create_from_upload(
                    owner=owner, name=skill, base=base, files=files, user=account, visibility="public",
                    tags=["demo", skill], description=card, seeds=seeds, message="Demo zoo upload",
                )
            except (ValidationError, services.Conflict, services.Forbidden) as exc:
                raise CommandError(f"adapter {repo}: {getattr(exc, 'detail', exc)}") from None
        self.stdout.write(f"adapter {repo}: uploaded (revision {rev.sha[:12]})")
