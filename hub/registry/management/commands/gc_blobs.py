"""`python manage.py gc_blobs [--grace-seconds N] [--dry-run]`: delete stored
blob files that have no Blob row (left by a crash) and are older than the
grace period, and staged uploads (`PUT /api/v1/uploads/{sha256}`) untouched
for as long, with their blobs unless something else refers to them (a push
never committed), and the partial files of resumable uploads left as long.
Celery beat runs the same daily (workers.reaper.gc_blobs)."""

from django.core.management.base import BaseCommand, CommandError

from hub.storage import GC_GRACE_SECONDS, collect_garbage


class Command(BaseCommand):
    help = ("Delete blob files without a Blob row, and staged uploads never committed, older than the grace "
            "period.")

    def add_arguments(self, parser):
        parser.add_argument("--grace-seconds", type=float, default=GC_GRACE_SECONDS,
                            help="keep files younger than this: an upload in flight writes its file before "
                                 f"its row commits (default {GC_GRACE_SECONDS:g})")
        parser.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")

    def handle(self, grace_seconds, dry_run, **options):
        if grace_seconds < 0:
            raise CommandError("--grace-seconds must be 0 or more.")
        removed = collect_garbage(grace_seconds, dry_run=dry_run)
        for key in removed:
            self.stdout.write(key)
        verb = "would delete" if dry_run else "deleted"
        self.stderr.write(f"gc_blobs: {verb} {len(removed)} file(s) without a row or only staged.")
