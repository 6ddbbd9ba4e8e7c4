"""`python manage.py hubtoken USER [--create-user] [--password] [--expires 30d]`: print a new
API token (last line of output) for scripts and first setup. `--password` also sets the
user's web password (asked twice on a terminal, else read from the first line of stdin),
so a user made here can sign in to the web UI too."""

import getpass
import sys

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.management.base import BaseCommand, CommandError

from hub.registry.services import token_create, token_lifetime
from hub.registry.validation import ValidationError


class Command(BaseCommand):
    help = "Create an API token for USER and print it as the last line."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--create-user", action="store_true", help="create the user if missing")
        parser.add_argument("--staff", action="store_true", help="make the user staff (may register base models)")
        parser.add_argument("--password", action="store_true",
                            help="also set the web UI password (prompted; from stdin when not a terminal)")
        parser.add_argument("--name", default="cli", help="a label for the token")
        parser.add_argument("--expires", default=None, help="lifetime, e.g. 30d, 12h or 90m (default: never)")

    def handle(self, username, create_user, staff, password, name, expires, **options):
        try:
            token_lifetime(expires)  # refused before anything is created
        except ValidationError as exc:
            raise CommandError(exc.detail) from None
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        raw_password = self.read_password(User(username=username)) if password else None
        if user is None:
            if not create_user:
                raise CommandError(f"No user '{username}'. Pass --create-user to create it.")
            user = User.objects.create_user(username=username)
            self.stderr.write(f"Created user {username}.")
        if raw_password is not None:
            user.set_password(raw_password)
            user.save(update_fields=["password"])
            self.stderr.write(f"Set the web password of {username}: sign in at /login/.")
        elif not user.has_usable_password():
            self.stderr.write(f"{username} has no web password (API tokens only): add --password, or run "
                              f"`python manage.py changepassword {username}`, to sign in to the web UI.")
        if staff and not user.is_staff:
            user.is_staff = True
            user.save(update_fields=["is_staff"])
        self.stdout.write(token_create(user=user, name=name, expires=expires))

    def read_password(self, user) -> str:
        """The new password, checked by the project's validators before anything is written."""
        if sys.stdin.isatty():
            first = getpass.getpass(f"Web password for {user.username}: ")
            if first != getpass.getpass("Again: "):
                raise CommandError("The passwords differ; nothing was changed.")
        else:
            first = sys.stdin.readline().rstrip("\r\n")
        if not first:
            raise CommandError("Empty password; nothing was changed.")
        try:
            validate_password(first, user)
        except DjangoValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        return first
