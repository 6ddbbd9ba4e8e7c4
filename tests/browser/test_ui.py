"""The web UI in a real browser (chromium, headless) against a live server:
sign in, upload by drag and drop with a progress bar, upload errors next to
their field, jobs that run on a real Celery worker and refresh the lineage
graph, deprecation with a retransfer plan, tokens, webhooks. Each page is saved as a
screenshot at desktop and phone width (docs/screenshots/)."""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import screenshot, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def wide_adapter(make_peft_adapter, tmp_path_factory):
    """A real PEFT adapter for a base with hidden size 96: wrong shapes for tiny-base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.model_fixtures import TINY_CONFIG

    wide = tmp_path_factory.mktemp("wide-base")
    LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, "hidden_size": 96})).save_pretrained(wide)
    return make_peft_adapter("wide", base_dir=wide)


def adapter_files(folder):
    return [str(p) for p in sorted(folder.iterdir()) if p.is_file()]


def test_sign_in_upload_by_drop_and_open_the_page(page, user, tiny_base, make_peft_adapter, tmp_path):
    from hub.registry.models import Adapter

    folder = make_peft_adapter("dropped")
    # A 3 MB README so the upload takes several progress events.
    (tmp_path / "README.md").write_text("# Dropped\n\n" + "A tiny LoRA for tests.\n" * 140_000)
    files = adapter_files(folder) + [str(tmp_path / "README.md")]

    sign_in(page, "alice", shot="signin")
    page.goto("/upload/")
    page.get_by_label("Base model").fill("tiny-base")
    page.get_by_label("Adapter name").fill("dropped")
    page.get_by_label("Tags").fill("demo, tiny")
    page.get_by_label("Model card").fill("# Dropped adapter\n\nUploaded by **drag and drop**.")

    # The drop handler, with a DataTransfer built in the page from real files.
    page.evaluate("""() => { const i = document.createElement('input'); i.type = 'file'; i.multiple = true;
                             i.id = 'scratch'; i.hidden = true; document.body.appendChild(i); }""")
    page.set_input_files("#scratch", files)
    page.evaluate("""() => {
        const dt = new DataTransfer();
        for (const f of document.getElementById('scratch').files) dt.items.add(f);
        const zone = document.getElementById('dropzone');
        for (const type of ['dragenter', 'dragover', 'drop'])
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""")
    page.wait_for_function("document.querySelectorAll('#file-list li').length === 3")
    assert page.evaluate("document.getElementById('id_files').files.length") == 3
    assert "adapter_model.safetensors" in page.inner_text("#file-list")

    # Record every value the progress bar takes.
    page.evaluate("""() => { window.progressSeen = [];
        const bar = document.getElementById('upload-progress');
        new MutationObserver(() => window.progressSeen.push(Number(bar.value)))
            .observe(bar, {attributes: true, attributeFilter: ['value']}); }""")
    page.get_by_role("button", name="Upload").click()
    page.wait_for_selector("#open-adapter")
    seen = page.evaluate("window.progressSeen")
    assert page.evaluate("document.getElementById('upload-progress').value") == 100
    assert seen[-1] == 100 and seen == sorted(seen[seen.index(0):] if 0 in seen else seen)
    assert Adapter.objects.filter(owner="alice", name="dropped").exists()

    page.click("#open-adapter")
    page.wait_for_url("**/adapters/alice/dropped/")
    assert page.inner_text("h1").startswith("alice/dropped")
    assert page.inner_text(".card-body h2") == "Dropped adapter"
    files_table = page.inner_text("table.files")
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert name in files_table
    assert page.locator("#lineage .node").count() == 1
    assert page.get_attribute("#lineage .node", "data-kind") == "upload"
    screenshot(page, "adapter", full=True)

    page.goto("/")
    assert page.locator(".card h2 a").inner_text() == "alice/dropped"


def test_wrong_shapes_error_shows_next_to_the_files(page, user, tiny_base, wide_adapter):
    from hub.registry.models import Adapter, Blob

    blobs = Blob.objects.count()
    sign_in(page, "alice")
    page.goto("/upload/")
    page.get_by_label("Base model").fill("tiny-base")
    page.get_by_label("Adapter name").fill("too-wide")
    files = adapter_files(wide_adapter)
    page.set_input_files("#id_files", files)  # the file input fallback
    assert page.locator("#file-list li").count() == len(files)
    page.get_by_role("button", name="Upload").click()
    error = page.locator("#err-files")
    error.wait_for(state="visible")
    text = error.inner_text()
    assert "q_proj" in text and "96" in text and "64" in text
    # next to the files field: inside its .field block, and announced for the input
    assert page.evaluate("document.getElementById('err-files').closest('.field').querySelector('#id_files') !== null")
    assert page.get_attribute("#id_files", "aria-invalid") == "true"
    assert "err-files" in page.get_attribute("#id_files", "aria-describedby")
    assert "nothing was stored" in page.inner_text("#upload-status")
    assert not Adapter.objects.exists() and Blob.objects.count() == blobs
    screenshot(page, "upload")


def test_jobs_run_on_a_worker_and_refresh_the_lineage(page, celery_procs, uploaded):
    from adapters_ops import opspecs

    celery_procs.worker("w1")
    sign_in(page, "alice")
    page.goto("/adapters/alice/lora/")
    assert page.locator("#lineage .node").count() == 1
    page.evaluate("document.getElementById('lineage').dataset.marker = 'before'")

    page.click("#op-validate summary")
    page.get_by_role("button", name="Start validate").click()
    job = page.locator("#live-jobs article.job").first
    job.locator("[data-testid=job-status]").filter(has_text="succeeded").wait_for(timeout=30_000)
    assert page.get_attribute("#live-jobs article.job progress", "value") == "1.000"
    assert "match their sha256" in job.inner_text()
    # the finished job told the page; the graph was fetched again (same single upload node)
    page.wait_for_function("!document.getElementById('lineage').dataset.marker")
    assert page.locator("#lineage .node").count() == 1

    # An op that creates a revision: the graph grows a child under the upload.
    op = "touch" if "touch" in opspecs.OPS else "scale"
    page.click(f"#op-{op} summary")
    page.get_by_role("button", name=f"Start {op}").click()
    page.locator("#live-jobs article.job").first.locator("[data-testid=job-status]").filter(
        has_text="succeeded").wait_for(timeout=30_000)
    page.wait_for_function("document.querySelectorAll('#lineage .node').length === 2")
    page.wait_for_function("document.querySelectorAll('#revisions tbody tr').length === 2")  # refreshed too
    kinds = page.eval_on_selector_all("#lineage .node", "ns => ns.map(n => n.dataset.kind)")
    assert kinds[0] == "upload" and len(kinds) == 2
    assert page.locator("#lineage path.edge").count() == 1
    screenshot(page, "adapter", full=True)

    page.goto("/jobs/")
    statuses = page.locator("[data-testid=job-status]").all_inner_texts()
    assert statuses == ["succeeded", "succeeded"]
    screenshot(page, "jobs")


def test_deprecate_with_plan_and_tokens(page, user, staff_user):
    from tests.frontend.conftest import make_adapter, make_base

    old = make_base("tiny-llama-3.0", config={"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    make_base("tiny-llama-3.1")
    wide = make_base("tiny-other-1.0", manifest={"model.layers.0.self_attn.q_proj.weight": {"shape": [96, 96]}})
    make_adapter("alice", "math", old, tags=["math"], metrics={"accuracy": 0.81}, downloads=12)
    make_adapter("alice", "poems", old, targets=["q_proj", "v_proj", "up_proj"], tags=["poetry"])
    make_adapter("admin", "code", old, tags=["code"])
    make_adapter("alice", "other", wide)

    sign_in(page, "admin")
    page.goto("/bases/tiny-llama-3.0/")
    page.get_by_label("Successor").select_option("tiny-other-1.0")
    page.get_by_role("button", name="Deprecate tiny-llama-3.0").click()
    page.wait_for_selector("text=Retransfer plan to tiny-other-1.0")
    plan = page.inner_text("#plan")
    assert plan.count("translora") >= 3 and "changes shape" in plan
    page.get_by_label("Successor").select_option("tiny-llama-3.1")
    page.get_by_role("button", name="Deprecate tiny-llama-3.0").click()
    page.wait_for_selector("text=Retransfer plan to tiny-llama-3.1")
    methods = page.locator("#plan tbody tr td:nth-child(2)").all_inner_texts()
    assert methods == ["diff", "diff", "diff"]
    assert page.locator("h1 .badge").inner_text() == "deprecated"
    screenshot(page, "base-model")

    page.goto("/bases/")
    screenshot(page, "base-models")
    page.goto("/?sort=downloads")
    assert page.locator(".card h2 a").first.inner_text() == "alice/math"
    screenshot(page, "home")

    page.goto("/tokens/")
    page.get_by_label("Token name").fill("laptop")
    page.get_by_role("button", name="Create token").click()
    token = page.inner_text("#new-token")
    assert re.fullmatch(r"hub_[A-Za-z0-9_-]{30,}", token.strip())
    screenshot(page, "tokens")
    page.reload()
    assert page.locator("#new-token").count() == 0  # shown once


def test_webhook_added_and_pinged(page, user, broker, webhook_receiver):
    import standardwebhooks

    from hub.registry.models import WebhookDelivery
    from workers.webhooks import deliver

    sign_in(page, "alice")
    page.goto("/webhooks/")
    page.get_by_label("Payload URL").fill(webhook_receiver.url)
    page.get_by_label("job.finished").uncheck()
    page.get_by_label("Description").fill("CI notifications")
    page.get_by_role("button", name="Add webhook").click()
    secret = page.inner_text("#new-secret").strip()
    assert secret.startswith("whsec_")
    assert "adapter.moved, adapter.move_failed" in page.inner_text("table")
    page.get_by_role("button", name=f"Send a test event to {webhook_receiver.url}").click()
    deliver(WebhookDelivery.objects.get().pk)
    page.reload()
    assert "delivered" in page.inner_text("table") and page.locator("#new-secret").count() == 0
    [req] = webhook_receiver.requests
    standardwebhooks.Webhook(secret).verify(req.body, req.headers)
    screenshot(page, "webhooks")


def test_keyboard_focus_is_visible(page):
    page.goto("/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Tab")
    focused = page.evaluate("""() => { const s = getComputedStyle(document.activeElement);
                                       return [document.activeElement.textContent, s.outlineStyle, s.outlineWidth]; }""")
    assert focused[0] == "Adapter hub" and focused[1] == "solid" and focused[2] == "3px"
