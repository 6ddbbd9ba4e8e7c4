"""A private adapter never reaches another user or an anonymous visitor
through any page: lists, search, filters, its own page, files, lineage of a
public child, base model pages and the retransfer plan. The owner (and a
superuser) see it: the positive control that keeps these tests honest."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db

SECRETS = ("zebra-secret", "hush-tag", "quagga")

LIST_PAGES = [
    "/",
    "/?q=zebra",
    "/?q=quagga",
    "/?tag=hush-tag",
    "/?base_model=tiny-1",
    "/?kind=upload",
    "/?sort=downloads",
    "/bases/",
    "/bases/tiny-1/",
    "/adapters/alice/public-child/",
    "/adapters/alice/public-child/lineage",
]

HIDDEN_PAGES = [
    "/adapters/alice/zebra-secret/",
    "/adapters/alice/zebra-secret/?rev=main",
    "/adapters/alice/zebra-secret/lineage",
    "/api/v1/adapters/alice/zebra-secret/files/adapter_config.json",
    "/alice/zebra-secret/resolve/main/adapter_config.json",
]


def viewer(request, name):
    return None if name == "anonymous" else request.getfixturevalue(name)


@pytest.mark.parametrize("who", ["other_user", "anonymous"])
@pytest.mark.parametrize("url", LIST_PAGES)
def test_list_pages_never_mention_the_private_adapter(request, world, web, who, url):
    r = web(viewer(request, who)).get(url)
    assert r.status_code == 200, url
    html = r.content.decode()
    for s in SECRETS + (world["secret_rev"].sha, world["secret_rev"].sha[:7]):
        if s not in url:  # a search echoes its own term in the search box
            assert s not in html, (url, s)
    if url in SEARCHES:
        assert "0 adapters" in html, url


SEARCHES = {"/?q=zebra", "/?q=quagga", "/?tag=hush-tag"}


@pytest.mark.parametrize("who", ["other_user", "anonymous"])
@pytest.mark.parametrize("url", HIDDEN_PAGES)
def test_private_adapter_pages_and_files_are_404(request, world, web, who, url):
    r = web(viewer(request, who)).get(url)
    assert r.status_code == 404, url
    assert b"quagga" not in r.content


def test_the_owner_sees_everything_the_others_do_not(world, web, user):
    c = web(user)
    home = c.get("/").content.decode()
    assert "zebra-secret" in home and "hush-tag" in home  # the card and the tag datalist
    assert "zebra-secret" in c.get("/?q=quagga").content.decode()
    page = c.get("/adapters/alice/zebra-secret/").content.decode()
    assert "quagga" in page and "adapter_config.json" in page
    child = c.get("/adapters/alice/public-child/lineage").content.decode()
    assert world["secret_rev"].sha in child and "zebra-secret" in child
    base = c.get("/bases/tiny-1/").content.decode()
    assert base.count("zebra-secret") >= 2  # its adapters list and the retransfer plan


def test_lineage_of_public_child_keeps_only_visible_nodes(world, web, other_user):
    html = web(other_user).get("/adapters/alice/public-child/").content.decode()
    assert f'data-sha="{world["child_rev"].sha}"' in html
    assert html.count('class="node ') == 1 and 'class="edge"' not in html


def test_adapter_counts_on_base_models_list_follow_visibility(world, web, user, other_user):
    def count(c):
        html = c.get("/bases/").content.decode()
        row = html.split('href="/bases/tiny-1/"', 1)[1].split("</tr>", 1)[0]
        return int(row.rsplit("<td>", 1)[1].split("</td>", 1)[0])

    assert count(web(other_user)) == 2
    assert count(web(user)) == 3


@pytest.mark.parametrize("who", ["other_user", "anonymous"])
def test_no_job_can_start_on_a_hidden_adapter(request, world, web, who):
    from hub.registry.models import Job

    r = web(viewer(request, who)).post("/adapters/alice/zebra-secret/jobs", {"op": "validate"})
    assert r.status_code in (302, 404)  # anonymous: sent to sign in; signed in: not found
    if r.status_code == 302:
        assert r["Location"].startswith("/login/")
    assert not Job.objects.exists()


def test_pages_read_rows_only_through_the_one_restriction():
    """The structural guard beside the behavioural tests above: the views reach adapters, jobs
    and webhooks only through frontend.visible (or the registry's selectors and services),
    so a new page cannot forget to restrict them."""
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[2] / "frontend" / "views.py"
    unrestricted = []
    for node in ast.walk(ast.parse(source.read_text())):
        # Adapter.objects..., Job.objects..., Revision.objects..., Webhook.objects..., or any visible_to(...) call
        if isinstance(node, ast.Attribute) and node.attr == "objects" and isinstance(node.value, ast.Name) \
                and node.value.id in ("Adapter", "Job", "Revision", "Webhook", "WebhookDelivery"):
            unrestricted.append(f"line {node.lineno}: {node.value.id}.objects")
        if isinstance(node, ast.Attribute) and node.attr in ("visible_to", "writable_by", "webhooks_visible_to"):
            unrestricted.append(f"line {node.lineno}: .{node.attr}")
    assert unrestricted == []
