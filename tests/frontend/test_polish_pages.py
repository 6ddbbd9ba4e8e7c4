"""Wording and rendering details of the pages (Django's test client): dates of a
deprecation read "from" when still ahead and "since" once past, backticks in a
base's description and in the job forms' summaries become code, a failed job
states its error once, and the home page shows a demo that failed or is building."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from hub import demo_status
from tests.frontend.conftest import make_adapter, make_base


@pytest.mark.parametrize("days, word", [(30, "from"), (-30, "since")])
def test_deprecation_date_wording(db, web, days, word):
    succ = make_base("succ")
    when = timezone.now() + timedelta(days=days)
    make_base("old", status="deprecated", successor=succ, deprecate_at=when)
    html = web().get("/bases/old/").content.decode()
    assert f'{word} <time datetime="{when.isoformat(timespec="seconds")[:19]}' in html.replace("+00:00", "")
    other = "since" if word == "from" else "from"
    assert f"{other} <time" not in html


def test_backticks_render_as_code(db, web, user):
    base = make_base("tiny-llama-3.0", description="Tiny demo base model `tiny-llama-3.0`, from `adapters_ops.zoo`.")
    make_adapter("alice", "lora", base)
    html = web().get("/bases/tiny-llama-3.0/").content.decode()
    assert "<code>tiny-llama-3.0</code>" in html and "`" not in html.split("<main", 1)[1]
    page = web(user).get("/adapters/alice/lora/").content.decode()
    assert "compact <code>compeft</code> revision" in page
    assert "`" not in page.split("<main", 1)[1].split("<pre", 1)[0]


def test_a_failed_job_states_its_error_once(db, web, user):
    from hub.registry.models import Job

    base = make_base("b")
    adapter, _ = make_adapter("alice", "lora", base)
    job = Job.objects.create(op="validate", owner=user, adapter=adapter, status="failed",
                             message="Failed: bad_file: the weights are damaged",
                             error="bad_file: the weights are damaged")
    html = web(user).get(f"/jobs/{job.id}/").content.decode()
    assert html.count("the weights are damaged") == 1 and 'role="alert"' in html


@pytest.mark.parametrize("state, detail, shown", [
    ("failed", "the zoo build exited with code 1", "The demo could not be set up:</strong> the zoo build exited"),
    ("building", "building the demo zoo", "The demo (tiny models and one adapter per skill"),
    ("ready", "demo registered", None),
])
def test_home_page_shows_the_demo_state(db, web, staff_user, settings, tmp_path, state, detail, shown):
    settings.HUB_HOME = tmp_path
    assert 'id="demo-status"' not in web().get("/").content.decode()  # no serve, no notice
    demo_status.write(tmp_path, state, detail, log=["zoo: Traceback", "OSError: disk full"])
    html = web().get("/").content.decode()
    if shown is None:
        assert 'id="demo-status"' not in html
        return
    assert shown in html and f'data-state="{state}"' in html
    assert "disk full" not in html  # the build's log is for staff
    if state == "failed":
        assert "OSError: disk full" in web(staff_user).get("/").content.decode()
