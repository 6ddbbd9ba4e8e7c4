"""The pages with Django's test client: browse filters and sort, base models,
deprecation (staff only), tokens (shown once, revocable), sign-in, CSRF,
model cards (sanitized), job forms and the live job widget."""

from __future__ import annotations

import re

import pytest

from tests.frontend.conftest import make_adapter, make_base

pytestmark = pytest.mark.django_db


def names(html: str) -> list[str]:
    """owner/name of each adapter card on a list page, in order."""
    return [f"{o}/{n}" for o, n in re.findall(r'<h2><a href="/adapters/([^/]+)/([^/]+)/">', html)]


@pytest.fixture
def catalogue(db, user):
    a = make_base("base-a")
    b = make_base("base-b")
    make_adapter("alice", "math-lora", a, tags=["math"], downloads=3, size=300, description="adds numbers")
    make_adapter("alice", "poem-lora", a, tags=["poetry"], downloads=9, size=100)
    big, _ = make_adapter("alice", "code-lora", b, tags=["code", "math"], downloads=1, size=900)
    return {"a": a, "b": b, "big": big}


@pytest.mark.parametrize("query, expected", [
    ("", {"alice/math-lora", "alice/poem-lora", "alice/code-lora"}),
    ("q=poem", {"alice/poem-lora"}),
    ("q=numbers", {"alice/math-lora"}),  # the model card is searched too
    ("base_model=base-b", {"alice/code-lora"}),
    ("tag=math", {"alice/math-lora", "alice/code-lora"}),
    ("tag=MATH", {"alice/math-lora", "alice/code-lora"}),
    ("kind=merge", set()),
    ("kind=upload&base_model=base-a&tag=poetry", {"alice/poem-lora"}),
])
def test_browse_filters(catalogue, web, query, expected):
    html = web().get(f"/?{query}").content.decode()
    assert set(names(html)) == expected


@pytest.mark.parametrize("sort, order", [
    ("downloads", ["alice/poem-lora", "alice/math-lora", "alice/code-lora"]),
    ("size", ["alice/code-lora", "alice/math-lora", "alice/poem-lora"]),
    ("name", ["alice/code-lora", "alice/math-lora", "alice/poem-lora"]),
])
def test_browse_sort(catalogue, web, sort, order):
    assert names(web().get(f"/?sort={sort}").content.decode()) == order


def test_base_models_list_shows_status_badges(db, web):
    import datetime as dt

    new = make_base("llama-new")
    make_base("llama-old", status="deprecated", successor=new,
              deprecate_at=dt.datetime(2025, 3, 1, tzinfo=dt.UTC))
    html = web().get("/bases/").content.decode()
    old_row = html.split('href="/bases/llama-old/"', 1)[1].split("</tr>", 1)[0]
    assert 'status-deprecated">deprecated</span>' in old_row
    assert 'href="/bases/llama-new/">llama-new</a>' in old_row and "2025-03-01" in old_row
    new_row = html.split('href="/bases/llama-new/"', 1)[1].split("</tr>", 1)[0]
    assert 'status-active">active</span>' in new_row


def test_deprecate_is_for_staff_only(db, web, user, staff_user):
    from hub.registry.models import BaseModel

    old, new = make_base("old"), make_base("new")
    page = web(user).get("/bases/old/").content.decode()
    assert "Deprecate old" not in page
    r = web(user).post("/bases/old/deprecate", {"successor": "new"})
    assert r.status_code == 403
    assert BaseModel.objects.get(slug="old").status == "active"

    assert "Deprecate old" in web(staff_user).get("/bases/old/").content.decode()
    r = web(staff_user).post("/bases/old/deprecate", {"successor": "new", "at": "2030-01-02T03:04"})
    assert r.status_code == 302
    old.refresh_from_db()
    assert (old.status, old.successor, old.deprecate_at.year) == ("deprecated", new, 2030)
    r = web(staff_user).post("/bases/old/deprecate", {"successor": "old"})
    assert r.status_code == 400  # not a choice: a base cannot succeed itself


def test_token_is_shown_once_and_works_until_revoked(db, web, user, other_user):
    from hub.registry.models import ApiToken

    c = web(user)
    r = c.post("/tokens/", {"name": "laptop"})
    assert r.status_code == 302
    page = c.get("/tokens/")
    raw = re.search(r"<pre id=\"new-token\"><code>(hub_[^<]+)</code>", page.content.decode())[1]
    assert page["Cache-Control"] == "no-store"
    assert raw not in c.get("/tokens/").content.decode()  # once only
    api = c.__class__()
    assert api.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {raw}").json()["username"] == "alice"

    token = ApiToken.objects.get(user=user, name="laptop")
    web(other_user).post(f"/tokens/{token.pk}/revoke")  # not theirs: nothing happens
    assert ApiToken.objects.filter(pk=token.pk).exists()
    web(user).post(f"/tokens/{token.pk}/revoke")
    assert not ApiToken.objects.filter(pk=token.pk).exists()
    assert api.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401


@pytest.mark.parametrize("url", ["/upload/", "/tokens/", "/jobs/"])
def test_personal_pages_need_sign_in(db, web, url):
    r = web().get(url)
    assert r.status_code == 302 and r["Location"] == f"/login/?next={url}"


@pytest.mark.parametrize("url, data", [
    ("/tokens/", {"name": "x"}),
    ("/logout/", {}),
    ("/bases/old/deprecate", {"successor": ""}),
])
def test_forms_refuse_posts_without_csrf_token(db, user, staff_user, url, data):
    from django.test import Client

    make_base("old")
    c = Client(enforce_csrf_checks=True)
    c.force_login(staff_user)
    assert c.post(url, data).status_code == 403
    page = c.get("/tokens/").content.decode()
    assert 'name="csrfmiddlewaretoken"' in page


def test_sign_in_and_out(db, user):
    from django.test import Client

    c = Client()
    bad = c.post("/login/", {"username": "alice", "password": "wrong"})
    assert bad.status_code == 200 and 'role="alert"' in bad.content.decode()
    ok = c.post("/login/", {"username": "alice", "password": "pw-123456", "next": "/jobs/"})
    assert ok.status_code == 302 and ok["Location"] == "/jobs/"
    assert "Sign out" in c.get("/").content.decode()
    c.post("/logout/")
    assert "Sign in" in c.get("/").content.decode()


def test_model_card_is_rendered_and_sanitized(db, web, user):
    card = ("---\nlicense: mit\n---\n# Title\n\nSome **bold** text.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
            "<script>alert(1)</script>\n\n[click](javascript:alert(2)) <img src=x onerror=alert(3)>\n\n"
            "```python\nprint('hi')\n```\n")
    make_adapter("alice", "carded", make_base("b"), description=card)
    html = web().get("/adapters/alice/carded/").content.decode()
    body = html.split('class="card-body">', 1)[1].split("</section>", 1)[0]
    assert "<h2>Title</h2>" in body and "<strong>bold</strong>" in body and "<table>" in body
    assert "<code class=\"language-python\">" in body
    assert "license: mit" not in body  # YAML front matter is metadata
    for bad in ("<script", "javascript:", "onerror"):
        assert bad not in body


def test_adapter_page_shows_files_revisions_metrics_and_snippets(world, web, user):
    html = web(user).get("/adapters/alice/public-child/").content.decode()
    assert "hubctl pull alice/public-child -o public-child" in html
    assert 'snapshot_download("alice/public-child")' in html
    assert 'os.environ["HF_ENDPOINT"] = "http://testserver"' in html
    assert 'PeftModel.from_pretrained(base, "alice/public-child")' in html
    assert "adapter_config.json" in html
    assert world["child_rev"].files.get().blob.sha256 in html
    assert "accuracy 75%" in html  # revision metrics
    assert f"zebra-secret@{world['secret_rev'].sha[:7]}" in html  # its parent, visible to the owner


def test_job_forms_follow_the_op_declarations_and_write_permission(world, web, user, other_user):
    from adapters_ops import opspecs

    html = web(user).get("/adapters/alice/public-child/").content.decode()
    for op, spec in opspecs.OPS.items():
        panel = html.split(f'id="op-{op}"', 1)[1].split("</details>", 1)[0]
        assert f'name="op" value="{op}"' in panel, op
        for p in spec.params:  # every declared param has a field, but the page's own adapter
            if p.name != (spec.writes or spec.reads[0]):
                assert f'name="{op}-{p.name}"' in panel, (op, p.name)
    # mallory may read the public child but not start jobs on it
    theirs = web(other_user).get("/adapters/alice/public-child/").content.decode()
    assert "Start a job" not in theirs and 'id="op-validate"' not in theirs
    r = web(other_user).post("/adapters/alice/public-child/jobs", {"op": "validate"})
    assert r.status_code == 403


def test_starting_a_validate_job_with_htmx(world, web, user):
    from hub.registry.models import Job

    c = web(user)
    r = c.post("/adapters/alice/public-child/jobs", {"op": "validate", "validate-revision": ""}, HTTP_HX_REQUEST="true")
    assert r.status_code == 200
    job = Job.objects.get()
    assert (job.op, job.params, job.owner, job.adapter) == ("validate", {"adapter": "alice/public-child"}, user,
                                                            world["child"])
    html = r.content.decode()
    assert 'hx-swap-oob="afterbegin:#live-jobs"' in html
    assert f'hx-get="/jobs/{job.id}/" hx-trigger="every 1s"' in html

    bad = c.post("/adapters/alice/public-child/jobs", {"op": "validate", "validate-revision": "no such/rev"},
                 HTTP_HX_REQUEST="true")
    assert bad.status_code == 422 and Job.objects.count() == 1
    err = bad.content.decode()
    assert 'id="id_validate-revision-error"' in err and "revision must be a ref name" in err
    # no JavaScript: a redirect to the page, which lists the job
    r = c.post("/adapters/alice/public-child/jobs", {"op": "validate"})
    assert r.status_code == 302 and r["Location"].startswith("/adapters/alice/public-child/?job=")
    assert Job.objects.count() == 2


def test_distill_merge_form_shows_the_missing_seeds_on_the_adapters_field(world, web, user):
    from hub.registry.models import Job

    c = web(user)
    html = c.get("/adapters/alice/public-child/").content.decode()
    panel = html.split('id="op-merge"', 1)[1].split("</details>", 1)[0]
    assert '<option value="distill">' in panel and 'name="merge-steps"' in panel
    r = c.post("/adapters/alice/public-child/jobs", {
        "op": "merge", "merge-others": "alice/zebra-secret", "merge-method": "distill", "merge-steps": "10",
        "merge-name": "alice/both"}, HTTP_HX_REQUEST="true")
    assert r.status_code == 422 and Job.objects.count() == 0
    err = r.content.decode()
    assert 'id="id_merge-others-error"' in err and "has no seed examples" in err


def test_unknown_op_is_refused(world, web, user):
    r = web(user).post("/adapters/alice/public-child/jobs", {"op": "no-such-op"})
    assert r.status_code == 400


def test_job_widget_polls_until_finished_then_signals(world, web, user, other_user):
    from hub.registry.models import Job

    job = Job.objects.create(op="validate", params={"adapter": "alice/public-child"}, owner=user,
                             adapter=world["child"], status="running", progress=0.4, message="Hashing")
    c = web(user)
    r = c.get(f"/jobs/{job.id}/", HTTP_HX_REQUEST="true")
    html = r.content.decode()
    assert 'hx-trigger="every 1s"' in html and 'value="0.400"' in html and "Hashing" in html
    assert "HX-Trigger" not in r
    Job.objects.filter(pk=job.pk).update(status="failed", progress=1.0, error="checksum_mismatch: bad bytes")
    r = c.get(f"/jobs/{job.id}/", HTTP_HX_REQUEST="true")
    html = r.content.decode()
    assert "hx-trigger" not in html and "checksum_mismatch: bad bytes" in html
    assert r["HX-Trigger"] == "job-finished"
    assert c.get(f"/jobs/{job.id}/").status_code == 200  # a full page without htmx
    assert web(other_user).get(f"/jobs/{job.id}/").status_code == 404
    assert "validate" in web(user).get("/jobs/").content.decode()
    assert "public-child" not in web(other_user).get("/jobs/").content.decode()


def test_cancel_a_queued_job(world, web, user):
    from hub.registry.models import Job

    job = Job.objects.create(op="validate", params={"adapter": "alice/public-child"}, owner=user,
                             adapter=world["child"])
    r = web(user).post(f"/jobs/{job.id}/cancel", HTTP_HX_REQUEST="true")
    assert r.status_code == 200 and 'data-status="cancelled"' in r.content.decode()
    job.refresh_from_db()
    assert job.status == "cancelled"


@pytest.mark.parametrize("url", ["/", "/bases/", "/bases/tiny-1/", "/bases/tiny-2/", "/adapters/alice/public-child/",
                                 "/upload/", "/tokens/", "/jobs/", "/login/"])
def test_pages_are_well_formed_and_labelled(world, web, user, url):
    """Each page: one h1, a main landmark, and a label for every visible input."""
    c = web(None if url == "/login/" else user)
    html = c.get(url).content.decode()
    assert html.count("<h1") == 1 and '<main id="main"' in html and "<nav" in html
    ids = set(re.findall(r'<label[^>]* for="([^"]+)"', html))
    for tag in re.findall(r"<(?:input|select|textarea)\b[^>]*>", html):
        if re.search(r'type="(hidden|submit|radio|checkbox)"', tag):
            continue
        m = re.search(r'\bid="([^"]+)"', tag)
        assert m and m[1] in ids, f"{url}: unlabelled {tag}"


def test_webhooks_page_creates_shows_the_secret_once_and_acts_only_on_own_hooks(transactional_db, broker, web, user, other_user,
                                                                              webhook_receiver, settings):
    from hub.registry.models import Webhook, WebhookDelivery
    from workers.webhooks import deliver

    c = web(user)
    bad = c.post("/webhooks/", {"url": "ftp://x.example/", "owner": "alice", "events": ["adapter.moved"]})
    assert bad.status_code == 400 and "http:// or https://" in bad.content.decode()
    assert not Webhook.objects.exists()
    forged = c.post("/webhooks/", {"url": "https://x.example/", "owner": "bob", "events": ["adapter.moved"]})
    assert forged.status_code == 400 and not Webhook.objects.exists()  # not one of alice's namespaces

    r = c.post("/webhooks/", {"url": webhook_receiver.url, "owner": "alice",
                              "events": ["adapter.moved", "adapter.move_failed"], "description": "CI"})
    assert r.status_code == 302
    page = c.get("/webhooks/")
    secret = re.search(r'<pre id="new-secret"><code>(whsec_[^<]+)</code>', page.content.decode())[1]
    hook = Webhook.objects.get()
    assert hook.secret == secret and hook.events == ["adapter.moved", "adapter.move_failed"]
    assert page["Cache-Control"] == "no-store"
    again = c.get("/webhooks/").content.decode()
    assert secret not in again and webhook_receiver.url in again and "none yet" in again

    bob = web(other_user)
    assert bob.post(f"/webhooks/{hook.pk}/delete").status_code == 404
    assert bob.get("/webhooks/").content.decode().count(webhook_receiver.url) == 0
    c = web(user)
    c.post(f"/webhooks/{hook.pk}/ping")
    deliver(WebhookDelivery.objects.get().pk)
    shown = c.get("/webhooks/").content.decode()
    assert "delivered" in shown and "HTTP 204" in shown
    c.post(f"/webhooks/{hook.pk}/disable")
    assert Webhook.objects.get().active is False and "disabled" in c.get("/webhooks/").content.decode()
    c.post(f"/webhooks/{hook.pk}/delete")
    assert not Webhook.objects.exists()


def test_merge_form_takes_full_and_auto_ranks(world, web, user):
    from hub.registry.models import Job

    c = web(user)
    panel = c.get("/adapters/alice/public-child/").content.decode().split('id="op-merge"', 1)[1]
    assert 'name="merge-energy"' in panel and 'name="merge-max_rank"' in panel
    base = {"op": "merge", "merge-others": "alice/zebra-secret", "merge-method": "ties", "merge-density": "0.5",
            "merge-name": "alice/both"}
    r = c.post("/adapters/alice/public-child/jobs", {**base, "merge-rank": "full"}, HTTP_HX_REQUEST="true")
    assert r.status_code == 200, r.content.decode()[:2000]
    assert Job.objects.get().params["rank"] == "full"
    r = c.post("/adapters/alice/public-child/jobs", {**base, "merge-rank": "auto", "merge-energy": "0.95",
                                                     "merge-max_rank": "16", "merge-name": "alice/both2"},
               HTTP_HX_REQUEST="true")
    assert r.status_code == 200, r.content.decode()[:2000]
    params = Job.objects.latest("created_at").params
    assert (params["rank"], params["energy"], params["max_rank"]) == ("auto", 0.95, 16)
    bad = c.post("/adapters/alice/public-child/jobs", {**base, "merge-rank": "bogus", "merge-name": "alice/both3"},
                 HTTP_HX_REQUEST="true")
    assert bad.status_code == 422 and Job.objects.count() == 2
    assert 'id="id_merge-rank-error"' in bad.content.decode() and "positive whole number" in bad.content.decode()
