"""Forms of the web UI: browse filters, the upload form (rendered for the
no-JavaScript fallback and for its labels), deprecation, tokens and webhooks.
The job forms are built from the op declarations (frontend/job_forms.py).
"""

from __future__ import annotations

from django import forms

from hub.registry.models import BaseModel, Revision, Webhook

SORTS = [("updated", "Recently updated"), ("created", "Newest"), ("downloads", "Most downloaded"),
         ("size", "Largest"), ("name", "Name")]


class BrowseForm(forms.Form):
    q = forms.CharField(required=False, label="Search", max_length=200)
    base_model = forms.ChoiceField(required=False, label="Base model")
    tag = forms.CharField(required=False, label="Tag", max_length=64)
    kind = forms.ChoiceField(required=False, label="Kind",
                             choices=[("", "Any kind")] + [(k, k) for k in Revision.KINDS])
    sort = forms.ChoiceField(required=False, label="Sort by", choices=SORTS)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        slugs = BaseModel.objects.values_list("slug", flat=True)
        self.fields["base_model"].choices = [("", "Any base model")] + [(s, s) for s in slugs]


class UploadForm(forms.Form):
    """Fields of the upload page. The JavaScript path posts them to the REST
    API (`name` = owner/name); without JavaScript this form posts to the page."""

    base_model = forms.CharField(label="Base model", max_length=96,
                                 widget=forms.TextInput(attrs={"list": "base-models", "autocomplete": "off"}))
    owner = forms.ChoiceField(label="Owner")
    name = forms.RegexField(label="Adapter name", regex=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$", max_length=96,
                            error_messages={"invalid": "Use letters, digits, '-', '_' or '.', starting with a "
                                                       "letter or digit."})
    visibility = forms.ChoiceField(label="Visibility", choices=[("public", "Public"), ("private", "Private")],
                                   initial="public", widget=forms.RadioSelect)
    tags = forms.CharField(label="Tags", required=False, max_length=500, help_text="Comma-separated.")
    description = forms.CharField(label="Model card (Markdown)", required=False,
                                  widget=forms.Textarea(attrs={"rows": 8}))

    def __init__(self, *args, owners=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["owner"].choices = [(o, o) for o in owners]


class DeprecateForm(forms.Form):
    """Deprecate a base model, or change a deprecation: it starts from the base's
    current successor and date, so saving it unchanged changes nothing."""

    successor = forms.ChoiceField(label="Successor", required=False)
    at = forms.DateTimeField(label="Deprecated from (UTC)", required=False,
                             widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
                             help_text="Empty: now.")

    def __init__(self, *args, base=None, **kwargs):
        if base is not None and base.status != "active":
            kwargs.setdefault("initial", {"successor": base.successor.slug if base.successor else "",
                                          "at": base.deprecate_at})
        super().__init__(*args, **kwargs)
        others = BaseModel.objects.exclude(pk=getattr(base, "pk", None)).values_list("slug", flat=True)
        self.fields["successor"].choices = [("", "No successor")] + [(s, s) for s in others]


class TokenForm(forms.Form):
    name = forms.CharField(label="Token name", max_length=64, initial="default",
                           help_text="A reminder of where you use it, e.g. laptop or CI.")
    expires = forms.ChoiceField(label="Expires", required=False, initial="",
                                choices=[("", "Never"), ("7d", "In 7 days"), ("30d", "In 30 days"),
                                         ("90d", "In 90 days"), ("365d", "In a year")],
                                help_text="After that the token is refused; revoke it any time.")


class WebhookForm(forms.Form):
    url = forms.CharField(label="Payload URL", max_length=500,
                          widget=forms.URLInput(attrs={"placeholder": "https://ci.example.com/hub-events"}))
    owner = forms.ChoiceField(label="Adapters of")
    events = forms.MultipleChoiceField(label="Events", widget=forms.CheckboxSelectMultiple,
                                       choices=[(e, e) for e in Webhook.EVENTS], initial=Webhook.EVENTS)
    description = forms.CharField(label="Description", max_length=200, required=False)

    def __init__(self, *args, owners=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["owner"].choices = [(o, o) for o in owners]
