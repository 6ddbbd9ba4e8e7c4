"""UI polish, measured in a real browser (chromium, headless): a 10-node
lineage graph keeps readable labels (font size as rendered, after any SVG
scaling) and scrolls instead of shrinking; the deprecation form starts from the
base's current successor and date; the filters do not clip their text; and no
page logs a console error (htmx, a missing favicon, a failed request)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.browser.conftest import DESKTOP, PHONE, sign_in
from tests.frontend.conftest import add_revision, make_adapter, make_base

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

# The rendered size of each label: its computed font size times the scale of its
# SVG on screen (a viewBox shrunk to fit a narrow box scales its text down too).
LABEL_SIZES = """() => [...document.querySelectorAll('#lineage svg text')].map(t =>
    parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a)"""


@pytest.fixture
def family(db, user):
    """alice/root and nine relatives (ten nodes), plus a stranger: a child of the
    other merge parent, which is not root's family."""
    base = make_base("tiny-llama-3.0")
    root, r1 = make_adapter("alice", "root", base, tags=["math"])
    add_revision(root, kind="compeft", parents=[r1])
    add_revision(root, kind="qalora", parents=[r1])
    for i in range(4):
        make_adapter("alice", f"root-moved-{i}", base, kind="transfer", parents=[r1])
    other, o1 = make_adapter("alice", "other", base)
    merged, m1 = make_adapter("alice", "merged-with-a-long-name", base, kind="merge", parents=[r1, o1])
    make_adapter("alice", "merged-compressed", base, kind="compeft", parents=[m1])
    make_adapter("alice", "stranger", base, kind="compeft", parents=[o1])
    return root


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_ten_node_lineage_is_readable_and_scrolls(page, family, viewport):
    page.set_viewport_size(viewport)
    page.goto("/adapters/alice/root/")
    assert page.locator("#lineage .node").count() == 10
    names = page.eval_on_selector_all("#lineage .node .n-name", "ns => ns.map(n => n.textContent)")
    assert "alice/stranger" not in names and "alice/other" in names
    sizes = page.evaluate(LABEL_SIZES)
    assert len(sizes) >= 30 and min(sizes) >= 11, sorted(sizes)[:5]
    # Drawn at its own width: the box scrolls sideways, the page does not.
    svg_width = page.evaluate("document.querySelector('#lineage svg').getBoundingClientRect().width")
    assert svg_width == pytest.approx(float(page.get_attribute("#lineage svg", "width")), abs=1)
    assert page.evaluate("(w => w.scrollWidth > w.clientWidth)(document.querySelector('#lineage .graph-wrap'))")
    assert page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0


def test_deprecation_form_starts_from_the_current_deprecation(page, staff_user):
    from hub.registry.models import BaseModel

    new = make_base("tiny-llama-3.1")
    make_base("tiny-llama-3.2")
    when = datetime(2027, 1, 2, 9, 30, tzinfo=UTC)
    make_base("tiny-llama-3.0", status="deprecated", successor=new, deprecate_at=when)
    sign_in(page, "admin")
    page.goto("/bases/tiny-llama-3.0/")
    assert page.locator("h1").inner_text().endswith("from 2027-01-02")  # a future date: not "since"
    assert page.get_by_label("Successor").input_value() == "tiny-llama-3.1"
    assert page.get_by_label("Deprecated from (UTC)").input_value() == "2027-01-02T09:30"
    page.get_by_role("button", name="Deprecate tiny-llama-3.0").click()  # saved as it is
    page.wait_for_url("**/bases/tiny-llama-3.0/")
    old = BaseModel.objects.get(slug="tiny-llama-3.0")
    assert (old.status, old.successor.slug, old.deprecate_at) == ("deprecated", "tiny-llama-3.1", when)
    assert page.get_by_label("Successor").input_value() == "tiny-llama-3.1"


def test_filters_do_not_clip_their_text(page, user):
    make_base("tiny-llama-3.0")
    make_base("a-very-long-base-model-slug-of-some-organization-70b-instruct-awq")  # a wide option
    page.goto("/?sort=downloads")
    for viewport in (DESKTOP, PHONE):
        page.set_viewport_size(viewport)
        clipped = page.evaluate("""() => {
            const ctx = document.createElement('canvas').getContext('2d');
            const out = [];
            for (const el of document.querySelectorAll('.filters select, .filters input[type=search]')) {
                const s = getComputedStyle(el);
                ctx.font = s.font;
                const text = el.tagName === 'SELECT' ? el.options[el.selectedIndex].text : el.placeholder;
                // room for the text: the content box, less the select's arrow
                const room = el.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight)
                             - (el.tagName === 'SELECT' ? 20 : 0);
                if (ctx.measureText(text).width > room) out.push([el.name, text, room]);
            }
            return out;
        }""")
        assert clipped == [], (viewport, clipped)
        assert page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 0


def test_no_console_errors_on_any_page(page, user, staff_user, broker):
    from hub.registry.models import Job

    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    base = make_base("tiny-llama-3.0", description="Tiny demo base `tiny-llama-3.0`.")
    make_base("tiny-llama-3.1")
    root, _ = make_adapter("alice", "lora", base, tags=["demo"], user=user)
    failed = Job.objects.create(op="validate", owner=user, adapter=root, status="failed",
                                message="Failed: bad_file: adapter_model.safetensors is damaged",
                                error="bad_file: adapter_model.safetensors is damaged")
    sign_in(page, "alice")
    pages = ["/", "/bases/", "/bases/tiny-llama-3.0/", "/adapters/alice/lora/", "/upload/", "/jobs/",
             f"/jobs/{failed.id}/", "/tokens/", "/webhooks/", "/api/docs/", "/?q=nothing-matches"]
    for url in pages:
        page.goto(url)
        page.wait_for_load_state("networkidle")
    page.goto(f"/jobs/{failed.id}/")  # a failed job says what failed once
    assert page.evaluate("document.querySelector('main').innerText.split('safetensors is damaged').length - 1") == 1

    # Starting jobs from the adapter page swaps the job list twice over (htmx).
    op = "validate"
    page.goto("/adapters/alice/lora/")
    for n in (1, 2):
        page.click(f"#op-{op} summary")
        page.get_by_role("button", name=f"Start {op}").click()
        page.wait_for_function(f"document.querySelectorAll('#live-jobs article.job').length === {n + 1}")
    assert not page.is_visible("#no-jobs")
    page.goto("/bases/tiny-llama-3.0/")
    assert page.inner_html(".card-body").count("<code>tiny-llama-3.0</code>") == 1

    page.context.clear_cookies()
    for url in ("/login/", "/", "/adapters/alice/lora/"):
        page.goto(url)
        page.wait_for_load_state("networkidle")
    assert problems == []
