"""`manage.py hubtoken USER --create-user --password`: the user it makes can
sign in to the web UI (the sign-in page names this command), and without
--password it says how to set one; a bad password changes nothing."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command


def hubtoken(monkeypatch, *args, stdin: str = "") -> tuple[str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out, err = io.StringIO(), io.StringIO()
    call_command("hubtoken", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_created_user_signs_in_on_the_web(client, monkeypatch):
    out, err = hubtoken(monkeypatch, "erin", "--create-user", "--password", stdin="a long pass phrase\n")
    assert out.strip().splitlines()[-1].startswith("hub_") and "Set the web password of erin" in err
    response = client.post("/login/", {"username": "erin", "password": "a long pass phrase"})
    assert response.status_code == 302 and response.url == "/"
    assert client.get("/tokens/").status_code == 200  # signed in


@pytest.mark.django_db
def test_without_password_the_command_says_how_to_set_one(client, monkeypatch):
    _, err = hubtoken(monkeypatch, "frank", "--create-user")
    assert "frank has no web password" in err and "--password" in err and "changepassword frank" in err
    assert not client.login(username="frank", password="")


@pytest.mark.django_db
@pytest.mark.parametrize("stdin, message", [("short\n", "too short"), ("\n", "Empty password")])
def test_a_refused_password_creates_nothing(monkeypatch, stdin, message):
    with pytest.raises(CommandError, match=message):
        hubtoken(monkeypatch, "gina", "--create-user", "--password", stdin=stdin)
    assert not get_user_model().objects.filter(username="gina").exists()


def test_the_sign_in_page_names_a_command_that_gives_a_password(client, db):
    html = client.get("/login/").content.decode()
    assert "hubtoken USER --create-user --password" in html
