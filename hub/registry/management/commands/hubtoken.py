"""`python manage.py hubtoken USER [--create-user] [--expires 30d]`: print a new API token
(last line of output) for scripts and first setup."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from hub.registry.services import token_create, token_lifetime
from hub.registry.validation import ValidationError


class Command(BaseCommand):
    help = "Create an API token for USER and print it as the last line."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--create-user", action="store_true", help="create the user if missing")
        parser.add_argument("--staff", action="store_true", help="make the user staff (may register base models)")
        parser.add_argument("--name", default="cli", help="a label for the token")
        parser.add_argument("--expires", default=None, help="lifetime, e.g. 30d, 12h or 90m (default: never)")

    def handle(self, username, create_user, staff, name, expires, **options):
        try:
            token_lifetime(expires)  # refused before anything is created
        except ValidationError as exc:
            raise CommandError(exc.detail) from None
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            if not create_user:
                raise CommandError(f"No user '{username}'. Pass --create-user to create it.")
            user = User.objects.create_user(username=username)
            self.stderr.write(f"Created user {username}.")
        if staff and not user.is_staff:
            user.is_staff = True
            user.save(update_fields=["is_staff"])
        self.stdout.write(token_create(user=user, name=name, expires=expires))
