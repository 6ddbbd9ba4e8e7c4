"""The verdict badge and the metrics table (frontend/templatetags/hub_ui.py):
labels, explanations, escaping, and what an upload or an unjudged derived revision shows."""

from types import SimpleNamespace

from frontend.templatetags import hub_ui


def test_badge_by_status_and_for_revisions_without_a_verdict():
    failed = {"status": "failed", "before": 1.0, "after": 0.0, "ratio": 0.0, "base": 0.0,
              "examples": {"source": "held_out_seeds", "n": 8, "of": 16}}
    html = hub_ui.verdict_badge(failed)
    assert 'class="badge verdict verdict-failed"' in html and ">verdict: failed 0%</span>" in html
    assert 'title="seed accuracy 1.00 → 0.00 (0%) on 8 held-out seeds of 16, bare base 0.00"' in html
    assert hub_ui.verdict_badge(SimpleNamespace(kind="upload", verdict=None)) == ""
    old = hub_ui.verdict_badge(SimpleNamespace(kind="compeft", verdict=None))  # made before verdicts
    assert "verdict-unverified" in old and "verdict: unverified<" in old
    assert hub_ui.verdict_text({"status": "unverified", "ratio": None, "reason": "no seeds"}) == "no seeds"


def test_metrics_table_labels_explains_and_escapes():
    html = hub_ui.metrics_table({"conversion_rel_error": 0.9912345, "bytes": {"quantized": 2048, "bf16": 8192},
                                 "note": "<script>", "verified": False})
    assert "QA-LoRA conversion error" in html and "0 = kept exactly, 1 = the update is lost" in html
    assert "0.9912" in html and "quantized: 2.0\xa0KB; bf16: 8.0\xa0KB" in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert ">no</td>" in html
    # labelled keys first, in METRIC_LABELS order
    assert html.index("verified") < html.index("conversion_rel_error") < html.index('data-metric="bytes"')
    assert hub_ui.metrics_table({}) == ""


def test_job_forms_offer_auto_settings():
    """The auto settings come from the op declarations, like every other field of the job forms."""
    from adapters_ops import opspecs
    from frontend.job_forms import OpForm

    a = SimpleNamespace(repo_id="alice/caesar", owner="alice", name="caesar", base_model_id=None)

    def form(op, data):
        return OpForm({f"{op}-{k}": v for k, v in data.items()}, spec=opspecs.OPS[op].describe(), adapter=a)

    f = form("compress", {"density": "auto", "scope": "global", "magnitude_bits": "0", "factorization": "as_is"})
    assert f.is_valid(), f.errors
    assert f.params()["density"] == "auto"
    f = form("compress", {"density": "lots", "scope": "global", "magnitude_bits": "0", "factorization": "as_is"})
    assert not f.is_valid() and "or 'auto'" in f.errors["density"][0]
    f = form("quantize", {"bits": "auto", "group_size": "32", "qalora_finetune_steps": "0"})
    assert f.is_valid(), f.errors
    assert f.params()["bits"] == "auto"
    f = form("quantize", {"bits": "4", "group_size": "32", "qalora_finetune_steps": "0"})
    assert f.is_valid() and f.params()["bits"] == 4  # the declared choice, an integer
    assert ("auto", "auto") in form("merge", {}).fields["method"].choices
