"""The model card's verdict (hub/hfcompat/card.py): a front-matter `verdict`
field and facts-table rows, so a failed or degraded result says so on its card."""

import yaml

from hub.hfcompat import card

FAILED = {"status": "failed", "before": 1.0, "after": 0.0, "ratio": 0.0, "base": 0.0,
          "reason": "keeps 0% of the source's accuracy (below 50%)", "tolerances": {"pass_ratio": 0.9},
          "examples": {"source": "held_out_seeds", "n": 8, "of": 16, "indices": [1, 2]}}


def test_front_matter_field_and_facts():
    data = card.card_data(slug="tiny-llama-3.0", kind="compeft", tags=[], verdict=FAILED)
    assert data["verdict"] == {"status": "failed", "before": 1.0, "after": 0.0, "ratio": 0.0, "base": 0.0,
                               "reason": FAILED["reason"],
                               "examples": {"source": "held_out_seeds", "n": 8, "of": 16}}
    text = card.render_card(data, title="alice/caesar", description="", usage="x",
                            facts=card.verdict_facts(FAILED))
    meta, _ = card.parse_card(text)
    assert meta["verdict"]["status"] == "failed" and yaml.safe_dump(meta)  # round-trips as YAML
    assert "| quality verdict | **failed** (keeps 0% of the source's accuracy (below 50%)) |" in text
    assert "| seed accuracy (source -> this revision) | 1.00 -> 0.00 (0%) on 8 held out seeds |" in text


def test_no_verdict_no_field_and_merge_skills():
    assert "verdict" not in card.card_data(slug="b", kind="upload", tags=[])
    assert card.verdict_facts(None) == []
    merged = {"status": "degraded", "skills": {"a/x": {"status": "passed"}, "a/y": {"status": "degraded"}}}
    assert card.verdict_field(merged) == {"status": "degraded", "skills": {"a/x": "passed", "a/y": "degraded"}}
    assert card.verdict_facts({"status": "unverified", "reason": "no seeds"}) == [
        ("quality verdict", "**unverified** (no seeds)")]
