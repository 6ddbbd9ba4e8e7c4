"""Model cards (README.md) in the Hugging Face layout: YAML front matter with
the model-tree fields (`library_name`, `base_model`, `base_model_relation`,
`new_version`), then markdown.

A revision that carries its own README.md is served as is; any other adapter
revision gets one generated here from the registry (description, base,
revision kind, rank). Pure functions over rows: no request, no storage."""

from __future__ import annotations

import re

import yaml

# What a revision is, relative to its base, in the Hub's model-tree words.
RELATION = {
    "upload": "adapter",
    "transfer": "adapter",
    "translora": "adapter",
    "merge": "merge",
    "compeft": "quantized",
    "qalora": "quantized",
}

# Tags the hub keeps from an uploaded card: plain words only (the PEFT template
# adds machine tags such as "base_model:adapter:/tmp/x", which say nothing here).
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")
MAX_CARD_BYTES = 1024 * 1024

_FRONT = re.compile(r"\A---[ \t]*\r?\n(?P<yaml>.*?)(?:\r?\n)?^---[ \t]*(?:\r?\n|\Z)", re.S | re.M)


class CardError(ValueError):
    """The card's YAML front matter cannot be read."""


def split_card(text: str) -> tuple[str | None, str]:
    """(YAML text or None when there is no front matter, markdown body)."""
    m = _FRONT.match(text)
    if m is None:
        return None, text
    return m["yaml"], text[m.end():]


def parse_card(text: str) -> tuple[dict, str]:
    """(metadata dict, markdown body). Raises CardError on YAML that is not a mapping."""
    raw, body = split_card(text)
    if raw is None or not raw.strip():
        return {}, body
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise CardError(f"The YAML metadata of README.md is invalid: {exc}") from None
    if data is None:
        return {}, body
    if not isinstance(data, dict):
        raise CardError("The YAML metadata of README.md must be a mapping (key: value lines).")
    return data, body


def card_tags(data: dict) -> list[str]:
    """The plain tags of a card, lower-cased, de-duplicated, in order."""
    raw = data.get("tags") or []
    if isinstance(raw, str):
        raw = [raw]
    out: list[str] = []
    for t in raw if isinstance(raw, list) else []:
        t = str(t).strip().lower()
        if TAG_RE.match(t) and t not in out:
            out.append(t)
    return out


def base_model_candidates(data: dict) -> list[str]:
    """The `base_model` values a card names (a string or a list)."""
    raw = data.get("base_model")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [str(v) for v in raw if isinstance(v, str | int)]
    return []


def card_data(*, slug: str, kind: str, tags: list[str], merged_from: list[str] = (),
              new_version: str | None = None, verdict: dict | None = None) -> dict:
    """The front-matter fields of a generated adapter card.

    A merge names the adapters it merged (the Hub's convention for merges:
    `base_model` is the list of merged models); without visible parents it
    names the base like any other revision. A derived revision's quality
    verdict goes under `verdict` (status, accuracies, ratio, examples used)."""
    relation = RELATION.get(kind, "adapter")
    data: dict = {"library_name": "peft"}
    if relation == "merge" and merged_from:
        data["base_model"] = list(merged_from)
    else:
        data["base_model"] = slug
    data["base_model_relation"] = relation
    all_tags = ["peft", "lora", "safetensors"] + [t for t in tags if t not in ("peft", "lora", "safetensors")]
    data["tags"] = all_tags
    if new_version:
        data["new_version"] = new_version
    if verdict:
        data["verdict"] = verdict_field(verdict)
    return data


VERDICT_KEYS = ("status", "before", "after", "ratio", "base", "reason")


def verdict_field(verdict: dict) -> dict:
    """The card's `verdict` front-matter field: the verdict without its per-skill detail,
    with the examples it was scored on (`held_out_seeds`, `all_seeds` or `none`, and how many)."""
    out = {k: verdict[k] for k in VERDICT_KEYS if verdict.get(k) is not None}
    ex = verdict.get("examples") or {}
    if ex:
        out["examples"] = {k: ex[k] for k in ("source", "n", "of") if k in ex}
    if verdict.get("skills"):
        out["skills"] = {name: v.get("status") for name, v in verdict["skills"].items()}
    return out


def verdict_facts(verdict: dict | None) -> list[tuple[str, str]]:
    """Facts-table rows for the verdict: a failed or degraded result says so on its card."""
    if not verdict:
        return []
    status = str(verdict.get("status", "unverified"))
    rows = [("quality verdict", f"**{status}**" + (f" ({verdict['reason']})" if verdict.get("reason") else ""))]
    if verdict.get("ratio") is not None:
        ex = verdict.get("examples") or {}
        on = f" on {ex['n']} {str(ex.get('source', 'seeds')).replace('_', ' ')}" if ex.get("n") else ""
        rows.append(("seed accuracy (source -> this revision)",
                     f"{float(verdict['before']):.2f} -> {float(verdict['after']):.2f} "
                     f"({float(verdict['ratio']):.0%}){on}"))
    return rows


def render_card(data: dict, *, title: str, description: str, facts: list[tuple[str, str]], usage: str) -> str:
    """README.md text: front matter, title, the adapter's description (or a
    line saying there is none), a facts table and a usage snippet."""
    front = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    body = description.strip() if description and description.strip() else "_No description was given._"
    _, body = split_card(body)  # a description that already holds front matter keeps only its markdown
    lines = ["---", front.rstrip("\n"), "---", "", f"# {title}", "", body.strip(), "", "## Revision", "",
             "| field | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in facts]
    lines += ["", "## Usage", "", "```python", usage.strip(), "```", ""]
    return "\n".join(lines)


def metric_facts(kind: str, metrics: dict | None) -> list[tuple[str, str]]:
    """Facts-table rows a revision's metrics add to its card: for a merge, the
    rank asked for and how much of the merged update the stored factors keep
    (min and mean over modules of the captured squared-Frobenius energy;
    1.0 = exact), so a lossy merge says so on its card."""
    m = metrics or {}
    if kind != "merge" or "min_captured_energy" not in m:
        return []
    rows = [("merge method", f"`{m['method']}`")] if m.get("method") else []
    if m.get("requested_rank") is not None:
        asked = m["requested_rank"]
        if m.get("energy_target") is not None:
            asked = f"{asked} (energy >= {m['energy_target']}" + (
                f", max rank {m['max_rank']})" if m.get("max_rank") is not None else ")")
        rows.append(("requested rank", str(asked)))
    rows.append(("captured energy (min / mean over modules)",
                 f"{float(m['min_captured_energy']):.4f} / {float(m.get('mean_captured_energy', 0.0)):.4f}"
                 + ("" if float(m["min_captured_energy"]) >= 0.9999 else " (lossy: the factors truncate the merge)")))
    return rows


def usage_snippet(repo_id: str, base: str, revision: str | None = None) -> str:
    rev = f', revision="{revision}"' if revision else ""
    return (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{rev})'
    )
