"""Forms of the web UI: browse filters, the upload form (rendered for the
no-JavaScript fallback and for its labels), deprecation, tokens, and one form
per job op that turns its fields into the op's `params` for `job_create`.

The op catalog (workers.catalog) stays the judge of params: these forms only
shape input (numbers, lists) and the catalog's ValidationError is shown next
to the field it names (`params.<field>`).
"""

from __future__ import annotations

import json

from django import forms

from hub.registry.models import BaseModel, Revision, Webhook
from workers.catalog import COMPOSE_METHODS

SORTS = [("updated", "Recently updated"), ("created", "Newest"), ("downloads", "Most downloaded"),
         ("size", "Largest"), ("name", "Name")]
ORDER = {"updated": "-updated_at", "created": "-created_at", "downloads": "-downloads", "size": "-size",
         "name": "name"}


class BrowseForm(forms.Form):
    q = forms.CharField(required=False, label="Search", max_length=200)
    base_model = forms.ChoiceField(required=False, label="Base model")
    tag = forms.CharField(required=False, label="Tag", max_length=64)
    kind = forms.ChoiceField(required=False, label="Kind", choices=[("", "Any kind")] + Revision.KINDS)
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
    successor = forms.ChoiceField(label="Successor", required=False)
    at = forms.DateTimeField(label="Deprecated from", required=False,
                             widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
                             help_text="Empty: now.")

    def __init__(self, *args, base=None, **kwargs):
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


# --- job forms -------------------------------------------------------------------------


class JobForm(forms.Form):
    """Base of the per-op forms. `params(adapter)` builds the op's params; blank
    optional fields are left out so the catalog applies its defaults."""

    op = ""
    title = ""
    summary = ""
    field_map: dict[str, str] = {}  # catalog param name -> form field name, where they differ

    def __init__(self, *args, adapter=None, **kwargs):
        kwargs.setdefault("prefix", self.op)
        super().__init__(*args, **kwargs)
        self.adapter = adapter

    def params(self) -> dict:
        out = {"adapter": self.adapter.repo_id}
        for key, value in self.cleaned_data.items():
            if value not in (None, ""):
                out[key] = value
        return out

    def field_for(self, param: str | None) -> str | None:
        """The form field a catalog error `params.<param>` belongs to (None: the form)."""
        if not param:
            return None
        name = param.removeprefix("params.").split(".", 1)[0]
        name = self.field_map.get(name, name)
        return name if name in self.fields else None


class ValidateForm(JobForm):
    op = "validate"
    title = "Validate"
    summary = "Re-hash every file and re-check the LoRA shapes against the base model."
    revision = forms.CharField(label="Revision", required=False, max_length=64, help_text="Empty: main.")


class CompressForm(JobForm):
    op = "compress"
    title = "Compress (ComPEFT)"
    summary = "Sparsify and ternarize the update; the result is a new `compeft` revision."
    revision = forms.CharField(label="Revision", required=False, max_length=64, help_text="Empty: main.")
    density = forms.CharField(label="Density", max_length=16, initial="0.1",
                              help_text="Fraction of entries kept (0–1], or auto: the smallest file that passes its "
                                        "verdict.")
    scope = forms.ChoiceField(label="Scope", choices=[("global", "global (one threshold)"),
                                                      ("tensor", "per tensor")], initial="global")
    magnitude_bits = forms.TypedChoiceField(
        label="Magnitudes", coerce=int, initial=0,
        choices=[(0, "one per tensor (ternary, the paper)"), (1, "2 per tensor"), (2, "4 per tensor"),
                 (3, "8 per tensor"), (4, "16 per tensor")],
        help_text="More magnitudes keep more of the skill at a larger file (docs/compeft.md).")
    factorization = forms.ChoiceField(label="Factors", initial="as_is",
                                      choices=[("as_is", "as trained"), ("balanced", "balanced (SVD of B @ A)")])

    def clean_density(self):  # the range is the catalog's to check
        raw = self.cleaned_data["density"].strip().lower()
        try:
            return raw if raw == "auto" else float(raw)
        except ValueError:
            raise forms.ValidationError("A number in (0, 1], or auto.") from None


class MergeForm(JobForm):
    op = "merge"
    title = "Merge"
    summary = "Combine this adapter with others on the same base into a new adapter."
    field_map = {"adapters": "others"}
    others = forms.CharField(label="Other adapters", max_length=2000,
                             help_text="owner/name, comma-separated; this adapter comes first.")
    weights = forms.CharField(label="Weights", required=False, max_length=500,
                              help_text="Comma-separated, one per adapter. Empty: equal weights.")
    method = forms.ChoiceField(label="Method", choices=[(m, m) for m in COMPOSE_METHODS + ("auto",)],
                               initial="linear",
                               help_text="distill: one adapter taught by every input from its seed examples "
                                         "(keeps the skills; minutes of work). auto: the best data-free method "
                                         "on the seeds if it passes, else distill.")
    density = forms.FloatField(label="Density", required=False, min_value=0.001, max_value=1.0,
                               widget=forms.NumberInput(attrs={"step": "any"}),
                               help_text="For ties, dare and magnitude_prune.")
    rank = forms.CharField(label="Rank", required=False, max_length=8,
                           help_text="A number, 'full' (exact) or 'auto' (smallest rank keeping the energy below). "
                                     "Empty: the method's default (lossy for the dense methods).")
    energy = forms.FloatField(label="Energy", required=False, min_value=0.0001, max_value=1.0,
                              widget=forms.NumberInput(attrs={"step": "any"}),
                              help_text="With rank 'auto': the share of the merged update to keep (default 0.99).")
    max_rank = forms.IntegerField(label="Max rank", required=False, min_value=1,
                                  help_text="With rank 'auto': the largest rank you accept.")
    steps = forms.IntegerField(label="Steps", required=False, min_value=1,
                               help_text="For distill: training steps. Empty: 1000 per adapter.")
    seed = forms.IntegerField(label="Seed", required=False, min_value=0, initial=0)
    name = forms.CharField(label="New adapter", max_length=193, help_text="owner/name of the result.")

    def __init__(self, *args, adapter=None, **kwargs):
        super().__init__(*args, adapter=adapter, **kwargs)
        if adapter is not None:
            self.fields["name"].initial = f"{adapter.owner}/{adapter.name}-merged"

    def clean_others(self):
        names = [n.strip() for n in self.cleaned_data["others"].split(",") if n.strip()]
        if not names:
            raise forms.ValidationError("Name at least one other adapter.")
        return names

    def clean_rank(self):
        raw = self.cleaned_data["rank"].strip().lower()
        if raw in ("", "auto", "full"):
            return raw
        if raw.isdecimal() and int(raw) >= 1:  # isdigit() passes "¹", which int() refuses
            return int(raw)
        raise forms.ValidationError("A positive whole number, 'auto' or 'full'.")

    def clean_weights(self):
        raw = [w.strip() for w in self.cleaned_data["weights"].split(",") if w.strip()]
        try:
            return [float(w) for w in raw]
        except ValueError:
            raise forms.ValidationError("Weights must be numbers.") from None

    def params(self) -> dict:
        data = dict(self.cleaned_data)
        out = {"adapters": [self.adapter.repo_id] + data.pop("others")}
        for key, value in data.items():
            if value not in (None, "", []):
                out[key] = value
        return out


class TransferForm(JobForm):
    op = "transfer"
    title = "Transfer to another base"
    summary = "Move the adapter to a new base model: exact re-application (diff) when shapes match, Trans-LoRA otherwise."
    target = forms.ChoiceField(label="Target base model")
    method = forms.ChoiceField(label="Method", choices=[("auto", "auto"), ("diff", "diff"), ("translora", "translora")],
                               initial="auto")
    finetune_steps = forms.IntegerField(label="Fine-tune steps", min_value=0, initial=0, required=False)
    name = forms.CharField(label="New adapter", required=False, max_length=193,
                           help_text="owner/name; empty: a new revision of this adapter.")

    def __init__(self, *args, adapter=None, **kwargs):
        super().__init__(*args, adapter=adapter, **kwargs)
        base_id = adapter.base_model_id if adapter is not None else None
        slugs = BaseModel.objects.exclude(pk=base_id).exclude(status="retired").values_list("slug", flat=True)
        self.fields["target"].choices = [(s, s) for s in slugs]
        if adapter is not None and adapter.base_model.successor_id:
            self.fields["target"].initial = adapter.base_model.successor.slug


class QuantizeForm(JobForm):
    op = "quantize"
    title = "Quantize (QA-LoRA)"
    summary = "Group-wise quantization with an optional QA-LoRA fine-tune."
    bits = forms.TypedChoiceField(label="Bits", coerce=lambda v: v if v == "auto" else int(v), initial=4,
                                  choices=[(4, "4"), (8, "8"), (3, "3"), (2, "2"), ("auto", "auto (fewest that pass)")])
    group_size = forms.IntegerField(label="Group size", min_value=1, initial=64)
    qalora_finetune_steps = forms.IntegerField(label="QA-LoRA fine-tune steps", min_value=0, initial=0)


class GenericJobForm(JobForm):
    """Any op the catalog lists that this UI has no form for: params as JSON."""

    params_json = forms.CharField(label="Parameters (JSON)", widget=forms.Textarea(attrs={"rows": 3}))

    def __init__(self, *args, op="", description="", adapter_param="adapter", adapter=None, **kwargs):
        self.op, self.title, self.summary = op, op, description
        kwargs["prefix"] = op
        super().__init__(*args, adapter=adapter, **kwargs)
        if adapter is not None and adapter_param:
            self.fields["params_json"].initial = json.dumps({adapter_param: adapter.repo_id})

    def clean_params_json(self):
        try:
            value = json.loads(self.cleaned_data["params_json"])
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc.msg}.") from None
        if not isinstance(value, dict):
            raise forms.ValidationError("Parameters must be a JSON object.")
        return value

    def params(self) -> dict:
        return self.cleaned_data["params_json"]

    def field_for(self, param):
        return "params_json"


OP_FORMS: dict[str, type[JobForm]] = {f.op: f for f in (ValidateForm, CompressForm, MergeForm, TransferForm,
                                                         QuantizeForm)}


def job_form(op: str, adapter, data=None) -> JobForm | None:
    """The form for `op` (a generic JSON form for ops this UI does not know), or
    None when the catalog does not list the op."""
    from workers import catalog

    spec = catalog.OPS.get(op)
    if spec is None:
        return None
    if op in OP_FORMS:
        return OP_FORMS[op](data, adapter=adapter)
    return GenericJobForm(data, op=op, description=spec.description, adapter_param=spec.adapter_param,
                          adapter=adapter)


def job_forms(adapter) -> list[dict]:
    """Every op panel of the adapter page: known ops (disabled when the catalog
    lacks them) then the catalog's other ops."""
    from workers import catalog

    panels = []
    for op, cls in OP_FORMS.items():
        form = job_form(op, adapter)
        panels.append({"op": op, "form": form or cls(adapter=adapter), "enabled": form is not None})
    for op in sorted(set(catalog.OPS) - set(OP_FORMS)):
        panels.append({"op": op, "form": job_form(op, adapter), "enabled": True})
    return panels
