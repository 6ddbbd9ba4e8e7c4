"""hubctl's table rows for structured REST fields (hub/cli/tables.py)."""

from hub.cli.tables import RETRANSFER_COLUMNS, retransfer_rows


def test_retransfer_rows():
    plan = [
        {"adapter": "demo/caesar", "method": "diff", "reason": "same shapes", "state": "transferred", "job": "j1",
         "progress": None, "result": {"adapter": "demo/caesar-tiny-llama-3.1", "sha": "a75700ded97f0123",
                                      "metrics": {}}},
        {"adapter": "demo/date", "method": "translora", "reason": "k_proj changes shape", "state": "in progress",
         "job": "5b0c0d9e-1111", "progress": 0.25, "result": None},
        {"adapter": "demo/upper", "method": "diff", "reason": "same shapes", "state": "planned", "job": None,
         "progress": None, "result": None},
    ]
    rows = retransfer_rows(plan)
    assert all(len(r) == len(RETRANSFER_COLUMNS) for r in rows)
    assert rows == [
        ["demo/caesar", "diff", "transferred", "", "demo/caesar-tiny-llama-3.1@a75700de", "same shapes"],
        ["demo/date", "translora", "in progress", "25%", "job 5b0c0d9e", "k_proj changes shape"],
        ["demo/upper", "diff", "planned", "", "", "same shapes"],
    ]
    assert retransfer_rows([]) == [] and retransfer_rows(None) == []
