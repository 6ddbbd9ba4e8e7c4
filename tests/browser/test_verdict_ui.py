"""The quality verdict in a real browser: a compress job started from the
adapter page at density 0.1 on the tiny zoo's caesar expert fails its verdict,
and the page says so (job card, highlighted panel, revisions table, lineage
node), at desktop and phone width (docs/screenshots/adapter-verdict-*.png)."""

from __future__ import annotations

import pytest

from tests.browser.conftest import screenshot, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def test_compress_that_fails_its_gate_shows_a_failed_verdict(page, celery_procs, user, staff_user, zoo_dir):
    from hub.registry.models import Job
    from tests.workers.test_ops_tensor import _upload
    from tests.workers.test_ops_transfer import _register_dir

    base = _register_dir(staff_user, "tiny-llama-3.0", zoo_dir / "bases" / "tiny-llama-3.0")
    _upload(user, base, zoo_dir / "adapters" / "caesar", "caesar",
            seeds=(zoo_dir / "tasks" / "caesar" / "seed.jsonl").read_bytes())
    celery_procs.worker("w1")
    sign_in(page, "alice")
    page.goto("/adapters/alice/caesar/")
    assert page.locator("[data-testid=verdict-panel]").count() == 0  # an upload has nothing to be judged against

    page.click("#op-compress summary")
    page.locator("#op-compress").get_by_label("Density").fill("0.1")
    page.get_by_role("button", name="Start compress").click()
    card = page.locator("#live-jobs article.job").first
    card.locator("[data-testid=job-status]").filter(has_text="succeeded").wait_for(timeout=120_000)
    # the job succeeded as a job, but its result is marked failed, in the badge and the message
    badge = card.locator("[data-testid=verdict]")
    assert badge.get_attribute("data-verdict") == "failed"
    assert badge.inner_text().startswith("verdict: failed")
    assert "Verdict: failed" in card.locator(".job-message").inner_text()

    rev = Job.objects.get(op="compress").result_revision
    v = rev.verdict
    page.goto(f"/adapters/alice/caesar/?rev={rev.sha}")
    panel = page.locator("[data-testid=verdict-panel]")
    assert panel.get_attribute("data-verdict") == "failed"
    text = panel.inner_text()
    assert f"seed accuracy {v['before']:.2f} → {v['after']:.2f} ({v['ratio']:.0%}) on 8 held-out seeds of 16" in text
    # the badge is highlighted: red filled, unlike a passed one
    colours = panel.locator("[data-testid=verdict]").evaluate(
        "b => [getComputedStyle(b).backgroundColor, getComputedStyle(b).color]")
    assert colours == ["rgb(198, 40, 40)", "rgb(255, 255, 255)"]
    # the revisions table: a verdict per derived revision, a dash for the upload
    revisions = page.locator("table.revisions > tbody > tr")
    row = revisions.and_(page.locator(".current"))
    assert row.locator("[data-testid=verdict]").get_attribute("data-verdict") == "failed"
    assert row.locator("tr[data-metric=size_ratio] th").inner_text().startswith("smaller by")
    assert revisions.nth(1).locator("td[data-label=Verdict]").inner_text().strip() == "—"
    # the lineage node of the compressed revision
    node = page.locator(f"#lineage .node[data-sha='{rev.sha}'] .n-verdict")
    assert node.get_attribute("data-verdict") == "failed" and node.text_content().startswith("failed")
    screenshot(page, "adapter-verdict", full=True)

    # the jobs list and the job's own page
    page.goto("/jobs/")
    assert page.locator("article.job [data-testid=verdict]").first.get_attribute("data-verdict") == "failed"
    page.goto(f"/jobs/{rev.job_id}/")
    assert page.locator("[data-testid=verdict-panel] [data-testid=verdict]").get_attribute("data-verdict") == "failed"
    assert page.locator("table.metrics-table tr[data-metric=density] td").inner_text() == "0.1"
