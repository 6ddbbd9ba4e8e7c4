"""Smoke tests of benchmarks/real_*.py: each script's core `run` on the tiny zoo (same layout
as the real lane: bases/, tasks/, adapters/, manifest.json), one skill, 4 test examples, so the
scripts cannot rot between real runs. The real lane (~30 min to build) is never needed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _real_lane as L  # noqa: E402
import real_auto  # noqa: E402
import real_compeft  # noqa: E402
import real_merge  # noqa: E402
import real_transfer  # noqa: E402
import real_translora  # noqa: E402

SRC, DST = "tiny-llama-3.0", "tiny-llama-3.1"


def test_compeft_cells_sizes_and_fractions(zoo_dir):
    res = real_compeft.run(zoo_dir, ["caesar"], base=SRC, limit=4, densities=(0.1,), log=lambda m: None)
    row = res["skills"]["caesar"]
    assert row["n"] == 4 and row["lora_from"] == "measured"  # the tiny zoo has no scores.json
    assert set(row["cells"]) == {"d=0.1", "d=0.1, scale chosen on seeds", "d=0.1, magnitude_bits=2"}
    for cell in row["cells"].values():
        assert 0.0 <= cell["accuracy"] <= 1.0 and cell["op_seconds"] >= 0 and cell["peak_rss_mb"] > 0
        assert cell["x_smaller_than_bf16"] == round(row["bf16_bytes"] / cell["file_bytes"], 1) > 1
    chosen = row["cells"]["d=0.1, scale chosen on seeds"]
    assert chosen["replace_factor"] in chosen["seed_scores"]
    # two magnitude bits per kept entry cost more bytes than the ternary file at the same density
    assert row["cells"]["d=0.1, magnitude_bits=2"]["file_bytes"] > row["cells"]["d=0.1"]["file_bytes"]
    assert "| caesar |" in real_compeft.table(res)


def test_transfer_rebase_is_the_unchanged_lora_and_finetune_is_scored(zoo_dir):
    res = real_transfer.run(zoo_dir, ["reverse"], source=SRC, target=DST, limit=4, finetune_skills=["reverse"],
                            finetune_steps=2, log=lambda m: None)
    row = res["skills"]["reverse"]
    assert row["rebase_identical_to_unchanged"] and row["transferred"] == row["unchanged"]
    assert all(row["from"][k] == "measured" for k in ("source", "target_base", "unchanged", "finetuned"))
    assert row["finetune"]["method"] == "diff+finetune" and row["finetune"]["seconds"] > 0
    assert row["finetune"]["verdict"] in ("passed", "degraded", "failed", "unverified")
    assert "| reverse |" in real_transfer.table(res)


def test_merge_methods_fractions_and_cat_equals_linear(zoo_dir):
    res = real_merge.run(zoo_dir, [("caesar", "reverse")], methods=("linear", "ties", "cat"), base=SRC, limit=4,
                         log=lambda m: None)
    rows = res["pairs"]["caesar+reverse"]["methods"]
    assert rows["ties"]["density"] == 0.5 and rows["linear"]["weights"] == [0.5, 0.5]
    assert rows["cat"]["same_tensors_as"] == "linear" and rows["cat"]["skills"] == rows["linear"]["skills"]
    for r in rows.values():
        for s, cell in r["skills"].items():
            assert cell["fraction"] == L.ratio(cell["accuracy"], res["singles"][s])
    assert "worst fraction" in real_merge.table(res)


def test_auto_density_row_and_both_verdicts(zoo_dir):
    res = real_auto.run(zoo_dir, ["caesar"], base=SRC, limit=4, densities=(0.1, 1.0), log=lambda m: None)
    row = res["skills"]["caesar"]
    assert row["density"] in (0.1, 1.0) and [t["density"] for t in row["tried"]][0] == 0.1
    assert row["seed_verdict"]["examples"]["source"] == "held_out_seeds" and row["seed_verdict"]["examples"]["n"] == 8
    assert row["test_verdict"]["status"] in ("passed", "degraded", "failed", "unverified")
    assert row["agree"] == (row["seed_verdict"]["status"] == row["test_verdict"]["status"])
    assert "| caesar |" in real_auto.table(res)


def test_merge_distill_cell(zoo_dir):
    res = real_merge.run(zoo_dir, [("caesar", "reverse")], methods=("distill",), base=SRC, limit=4,
                         distill={"synthetic": 16, "steps": 4}, log=lambda m: None)
    row = res["pairs"]["caesar+reverse"]["methods"]["distill"]
    assert row["weights"] is None and row["same_tensors_as"] is None and row["seconds"] > 0
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in row["skills"].values())


def test_translora_row_counts_and_fractions(zoo_dir):
    res = real_translora.run(zoo_dir, ["reverse"], source=SRC, target=DST, limit=4,
                             config={"n_synthetic": 16, "steps": 4, "eval_every": 2, "batch_size": 4}, log=lambda m: None)
    row = res["skills"]["reverse"]
    assert res["config"]["steps"] == 4 and row["n"] == 4
    assert row["fraction_of_source"] == L.ratio(row["translora"], row["source"])
    assert 0 < row["counts"]["kept"] <= row["counts"]["generated"] and row["distill"]["steps_run"] <= 4
    assert row["labels"] == {"rows": row["counts"]["labelled"], "decidable": None, "precision": None}  # no rule
    assert "| reverse |" in real_translora.table(res)


@pytest.mark.parametrize("skill", sorted(real_translora.RULES))
def test_label_rules_agree_with_the_lane_generator(skill):
    """The rules that grade synthetic labels must give the generator's own answer on its
    questions (else label precision would measure the rule, not the labels)."""
    import random

    from adapters_ops import _real_data as D

    rng = random.Random(3)
    pairs = [D.SKILLS[skill].gen(rng, part) for part in ("train", "test") for _ in range(100)]
    rule = real_translora.RULES[skill]
    assert sum(rule(q) == a for q, a in pairs) >= 190, [(q, a, rule(q)) for q, a in pairs if rule(q) != a][:3]
    prompt = "<|im_start|>user\n" + pairs[0][0] + "<|im_end|>\n<|im_start|>assistant\n"
    rows = [{"prompt": prompt, "completion": pairs[0][1]}, {"prompt": prompt, "completion": "wrong"}]
    assert real_translora.label_precision(skill, rows) == {"rows": 2, "decidable": 1.0, "precision": 0.5}


@pytest.mark.parametrize("script", ["real_compeft.py", "real_transfer.py", "real_merge.py", "real_translora.py", "real_auto.py"])
def test_scripts_help_and_missing_lane(script, tmp_path):
    run = [sys.executable, str(BENCH / script)]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--quick" in out.stdout and "--lane" in out.stdout
    out = subprocess.run([*run, "--lane", str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no real lane" in out.stderr and "Traceback" not in out.stderr


def test_json_written(tmp_path):
    L.write_json(tmp_path / "r" / "x.json", {"a": 1})
    assert json.loads((tmp_path / "r" / "x.json").read_text()) == {"a": 1}
