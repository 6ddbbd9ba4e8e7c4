"""Template helpers: model cards (Markdown, sanitized), sizes, short ids, quality verdicts
and metrics tables."""

from __future__ import annotations

import re

import markdown as md
import nh3
from django import template
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.html import escape, format_html
from django.utils.safestring import mark_safe

register = template.Library()

# What a model card may contain after Markdown: text structure, code, tables,
# links and images. nh3 drops everything else (scripts, styles, event handlers,
# javascript: URLs) and adds rel="noopener noreferrer nofollow" to links.
CARD_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "details", "div", "dl", "dt", "em", "h1", "h2",
    "h3", "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p", "pre", "s", "span", "strong", "sub",
    "summary", "sup", "table", "tbody", "td", "th", "thead", "tr", "ul",
}
CARD_ATTRS = {"a": {"href", "title"}, "img": {"src", "alt", "title", "width", "height"}, "th": {"align"},
              "td": {"align"}, "code": {"class"}}
FRONT_MATTER = re.compile(r"\A---\s*\n.*?\n---\s*(\n|\Z)", re.S)


def render_card(text: str) -> str:
    """Markdown -> sanitized HTML. HF model cards start with YAML front matter
    (metadata, not prose): it is left out of the rendering."""
    text = FRONT_MATTER.sub("", text or "", count=1)
    html = md.markdown(text, extensions=["fenced_code", "tables", "sane_lists"], output_format="html")
    # Headings inside a card start at h2: the page's h1 is the adapter's name.
    html = re.sub(r"<(/?)h([1-5])>", lambda m: f"<{m[1]}h{int(m[2]) + 1}>", html)
    return nh3.clean(html, tags=CARD_TAGS, attributes=CARD_ATTRS, url_schemes={"http", "https", "mailto"},
                     link_rel="noopener noreferrer nofollow")


@register.filter
def model_card(text):
    return mark_safe(render_card(text))  # noqa: S308 - sanitized by nh3 above


INLINE_CODE = re.compile(r"`([^`\n]+)`")


@register.filter
def inline_code(text):
    """One line of help text with `code` spans (the op declarations' wording): escaped,
    then each backtick pair becomes <code>."""
    return mark_safe(INLINE_CODE.sub(r"<code>\1</code>", escape(text or "")))  # noqa: S308 - escaped first


@register.filter
def in_future(when) -> bool:
    return bool(when) and when > timezone.now()


@register.filter
def short_sha(sha):
    return (sha or "")[:8]


@register.filter
def percent(value):
    try:
        return f"{100 * float(value):.0f}%"
    except (TypeError, ValueError):
        return ""


@register.filter
def metric(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


@register.simple_tag(takes_context=True)
def nav_class(context, prefix):
    """aria-current for the nav link of the section the page belongs to."""
    path = context["request"].path
    current = path == "/" if prefix == "/" else path.startswith(prefix)
    return mark_safe(' aria-current="page"') if current else ""  # noqa: S308 - a constant string


# --- quality verdicts and metrics (docs/jobs.md) ------------------------------------------------

DERIVED_KINDS = ("compeft", "merge", "transfer", "translora", "qalora")
VERDICT_EXAMPLES = {"held_out_seeds": "held-out seeds", "all_seeds": "seeds",
                    "synthetic_labelled_by_source": "synthetic inputs labelled by the source, from"}


def revision_verdict(rev) -> dict | None:
    """The verdict to show for a revision: its own, `unverified` for a derived revision made
    before verdicts existed, None for an upload (nothing to compare it with)."""
    verdict = getattr(rev, "verdict", None)
    if verdict:
        return verdict
    if getattr(rev, "kind", "upload") in DERIVED_KINDS:
        return {"status": "unverified", "reason": "this revision was not judged"}
    return None


def verdict_text(verdict: dict) -> str:
    """`seed accuracy 1.00 → 0.00 (0%) on 8 held-out seeds of 16, bare base 0.00`, or the reason."""
    if verdict.get("ratio") is None:
        return str(verdict.get("reason") or "not scored")
    ex = verdict.get("examples") or {}
    text = f"seed accuracy {float(verdict['before']):.2f} → {float(verdict['after']):.2f} ({float(verdict['ratio']):.0%})"
    if ex.get("n"):
        text += f" on {ex['n']} {VERDICT_EXAMPLES.get(ex.get('source'), 'examples')}"
        text += f" of {ex['of']}" if ex.get("of") else ""
    if verdict.get("base") is not None:
        text += f", bare base {float(verdict['base']):.2f}"
    return text


@register.simple_tag
def verdict_badge(rev_or_verdict):
    """A badge for a revision (or a verdict dict): its status, and the ratio when scored."""
    verdict = rev_or_verdict if isinstance(rev_or_verdict, dict) else revision_verdict(rev_or_verdict)
    if not verdict:
        return ""
    status = str(verdict.get("status", "unverified"))
    ratio = verdict.get("ratio")
    label = f"{status} {float(ratio):.0%}" if isinstance(ratio, (int, float)) else status
    return format_html('<span class="badge verdict verdict-{}" data-testid="verdict" data-verdict="{}" title="{}">'
                       'verdict: {}</span>', status, status, verdict_text(verdict), label)


@register.filter
def verdict_of(rev):
    return revision_verdict(rev)


@register.filter
def verdict_summary(verdict):
    return verdict_text(verdict) if verdict else ""


# Labels of the metric keys ops record, and explanations where a name says too little.
METRIC_LABELS = {
    "density": ("density", "fraction of the update's entries kept"),
    "scope": ("scope", ""),
    "replace_factor": ("scale factor", "magnitude = factor × std of the kept values"),
    "scale_search": ("scale search", "the factor chosen on the seeds the verdict does not read"),
    "nbytes": ("compressed size", ""),
    "original_nbytes": ("original size", ""),
    "size_ratio": ("smaller by", "original size / compressed size"),
    "magnitude_bits": ("magnitude bits", "0: one magnitude per tensor (the paper's ternary rule)"),
    "factorization": ("factorization", ""),
    "seed_accuracy": ("seed accuracy (result)", "exact match on the verdict's examples"),
    "seed_accuracy_single": ("seed accuracy (single input)", "each input adapter alone, same examples"),
    "source_with_adapter": ("gate: source base + adapter", "exact match on the examples the gate chose on"),
    "target_base": ("gate: bare target base", ""),
    "target_with_transferred": ("gate: target + transferred", ""),
    "recovered": ("gate: share of the gain kept", "(target + transferred − bare target) / (source − bare target)"),
    "verified": ("gate passed", "the transferred adapter beat the bare target on the gate's examples"),
    "compatible": ("same shapes (diff transfer possible)", ""),
    "bits": ("bits", ""),
    "group_size": ("group size", ""),
    "size_ratio_vs_bf16": ("smaller than bf16 by", ""),
    "bits_per_weight": ("bits per weight", "codes + an fp16 scale and zero point per group"),
    "conversion_rel_error": (
        "QA-LoRA conversion error",
        "relative error of the adapter's update once made constant within each quantization group "
        "(QA-LoRA form): 0 = kept exactly, 1 = the update is lost. A plain LoRA that is not group-constant "
        "loses most of it; recovery (qalora_finetune_steps) trains it back"),
    "merge_max_logit_diff": ("merge exactness (max logit difference)",
                             "merged into the zero points vs the quantized base + QA-LoRA; ~0 = exact"),
    "codes_unchanged": ("quantized codes unchanged by the merge", ""),
    "integer_zero_point_error": ("integer zero-point error", ""),
    "min_captured_energy": ("captured energy (min over modules)", "1.0 = the stored factors hold the exact merge"),
    "mean_captured_energy": ("captured energy (mean over modules)", ""),
}


def _fmt(key: str, value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and ("bytes" in key or key in ("quantized", "bf16")):
        return filesizeformat(value)
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            inner = _fmt(k, v)
            parts.append(f"{str(k).replace('_', ' ')}: " + (f"({inner})" if isinstance(v, dict) else inner))
        return "; ".join(parts)
    if isinstance(value, list):
        return ", ".join(_fmt(key, v) for v in value)
    return str(value)


@register.simple_tag
def metrics_table(metrics):
    """A revision's metrics as a two-column table with readable labels and values (nested
    dicts one line each), explanations under the label where the name says too little."""
    if not metrics:
        return ""
    rows = []
    known = list(METRIC_LABELS)  # the labelled keys first, in the order above (JSON keys come back sorted)
    for key, value in sorted(metrics.items(), key=lambda kv: (known.index(kv[0]) if kv[0] in known else len(known),
                                                              kv[0])):
        label, help_text = METRIC_LABELS.get(key, (key.replace("_", " "), ""))
        rows.append(format_html('<tr data-metric="{}"><th scope="row">{}{}</th><td>{}</td></tr>', key, label,
                                format_html('<span class="metric-help">{}</span>', help_text) if help_text else "",
                                _fmt(key, value)))
    return format_html('<table class="metrics-table"><tbody>{}</tbody></table>', mark_safe("".join(rows)))  # noqa: S308 - each row escaped by format_html
