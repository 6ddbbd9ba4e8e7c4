"""Template helpers: model cards (Markdown, sanitized), sizes, short ids."""

from __future__ import annotations

import re

import markdown as md
import nh3
from django import template
from django.utils import timezone
from django.utils.html import escape
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
