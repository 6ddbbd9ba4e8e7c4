"""`manage.py nginx_conf [--upstream HOST:PORT]`: the nginx server block of docs/deploy.md
for this site's settings (BLOB_ROOT, BLOB_ACCEL_PREFIX, UPLOAD_ACCEL_ROOT), to put in front
of the hub with BLOB_ACCEL=x-accel-redirect and UPLOAD_ACCEL=nginx."""

from django.conf import settings
from django.core.management.base import BaseCommand

from hub.nginx import server_block


class Command(BaseCommand):
    help = "Print the nginx server block for this hub's blob store (docs/deploy.md, 'nginx in front')."

    def add_arguments(self, parser):
        parser.add_argument("--upstream", default="127.0.0.1:8000", help="where the hub's web process listens")
        parser.add_argument("--listen", default=None, help="nginx's listen directive (default: none, nginx's own)")

    def handle(self, *args, upstream, listen, **options):
        self.stdout.write(server_block(upstream=upstream, blob_root=str(settings.BLOB_ROOT),
                                       accel_prefix=settings.BLOB_ACCEL_PREFIX,
                                       body_root=settings.UPLOAD_ACCEL_ROOT or None, listen=listen), ending="")
