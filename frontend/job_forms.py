"""The adapter page's job forms, one generic form built from each op's
declaration (adapters_ops.opspecs, the same JSON as `GET /api/v1/ops`).

A form only shapes input (numbers, comma-separated lists, a JSON object); the
op's declaration stays the judge of params (`job_create`), and its error is
shown next to the field it names (`params.<field>`). Blank optional fields are
left out, so the op's defaults apply.
"""

from __future__ import annotations

import json

from django import forms

from adapters_ops import opspecs
from hub.registry.models import BaseModel


class OpForm(forms.Form):
    """The fields of one op, minus the adapter the page is about (it fills the
    op's `writes` or first `reads` param itself)."""

    def __init__(self, data=None, *, spec: dict, adapter=None):
        super().__init__(data, prefix=spec["name"])
        self.spec, self.adapter = spec, adapter
        self.op, self.title, self.summary = spec["name"], spec["title"], spec["summary"]
        # The page's adapter: the param the op writes, else the (first of the) adapters it reads.
        self.subject = spec["writes"] or (spec["reads"][0] if spec["reads"] else None)
        for p in spec["params"]:
            if p["name"] == self.subject and p["type"] == "repo":
                continue
            self.fields[self._field_name(p)] = self._field(p)

    def _field_name(self, p: dict) -> str:
        return "others" if p["name"] == self.subject else p["name"]

    def _field(self, p: dict) -> forms.Field:
        kind, required = p["type"], p["required"]
        common = {"label": p["label"], "required": required, "help_text": p["help"], "initial": p.get("default")}
        if p["name"] == self.subject:  # a list of adapters, this one first: ask for the others
            return forms.CharField(**{**common, "label": "Other adapters", "initial": None,
                                      "help_text": "owner/name, comma-separated; this adapter comes first."},
                                   max_length=2000)
        if kind == "base":
            return forms.ChoiceField(**common, choices=self._bases(p["name"]))
        if p["name"] == self.spec["creates"] and self.adapter is not None:
            common["initial"] = f"{self.adapter.owner}/{self.adapter.name}-{self.op}"
        if kind == "bool":
            return forms.BooleanField(**{**common, "required": False})
        if kind == "choice":
            by_text = {str(c): c for c in p["choices"]}  # 4 for "4", "auto" for "auto"
            coerce = by_text.__getitem__
            blank = [] if p.get("default") is not None or required else [("", "default")]
            return forms.TypedChoiceField(**common, coerce=coerce, empty_value=None,
                                          choices=blank + [(c, str(c)) for c in p["choices"]])
        if kind in ("int", "float") and not p.get("words"):
            cls = forms.IntegerField if kind == "int" else forms.FloatField
            attrs = {} if kind == "int" else {"step": "any"}
            return cls(**common, min_value=p.get("min"), max_value=p.get("max"), widget=forms.NumberInput(attrs))
        if kind == "object":
            return forms.CharField(**{**common, "help_text": f"{p['help']}: a JSON object, e.g. {{\"steps\": 500}}."},
                                   widget=forms.Textarea(attrs={"rows": 2}))
        if kind in ("floats", "strs", "repos"):
            return forms.CharField(**{**common, "help_text": f"{p['help']} (comma-separated)"}, max_length=2000)
        if kind == "ref":
            return forms.CharField(**{**common, "help_text": "Empty: main."}, max_length=64)
        if kind in ("int", "float"):  # a number or one of its words ("auto", "full")
            words = " or ".join(f"'{w}'" for w in p["words"])
            return forms.CharField(**{**common, "help_text": f"{p['help']}: a number or {words}."}, max_length=16)
        return forms.CharField(**common, max_length=193)

    def _bases(self, name: str) -> list[tuple[str, str]]:
        own = getattr(self.adapter, "base_model_id", None)
        slugs = BaseModel.objects.exclude(pk=own).exclude(status="retired").values_list("slug", flat=True)
        if self.adapter is not None and self.adapter.base_model.successor_id:
            self.initial.setdefault(name, self.adapter.base_model.successor.slug)
        return [(s, s) for s in slugs]

    def clean(self):
        data = super().clean()
        for p in self.spec["params"]:
            name = self._field_name(p)
            raw = data.get(name)
            if not isinstance(raw, str) or name not in self.fields:
                continue
            raw = raw.strip()
            try:
                data[name] = _parse(p, raw, is_others=name == "others")
            except ValueError as exc:
                self.add_error(name, str(exc))
        return data

    def params(self) -> dict:
        out = {}
        if self.subject and self.adapter is not None:
            others = self.cleaned_data.get("others")
            out[self.subject] = [self.adapter.repo_id, *others] if others is not None else self.adapter.repo_id
        for p in self.spec["params"]:
            name = self._field_name(p)
            value = self.cleaned_data.get(name)
            if name != "others" and value not in (None, "", []):
                out[p["name"]] = value
        return out

    def field_for(self, param: str | None) -> str | None:
        """The form field an error `params.<param>[.<key>]` belongs to (None: the form)."""
        if not param:
            return None
        name = param.removeprefix("params.").split(".", 1)[0]
        name = "others" if name == self.subject else name
        return name if name in self.fields else None


def _parse(p: dict, raw: str, is_others: bool):
    """Text from a form field as the JSON value the op takes (None: left out)."""
    if raw == "":
        if is_others:
            raise ValueError("Name at least one other adapter.")
        return None
    kind = p["type"]
    if kind in ("repos", "strs") or is_others:
        return [v.strip() for v in raw.split(",") if v.strip()]
    if kind == "floats":
        try:
            return [float(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise ValueError("Give numbers, comma-separated.") from None
    if kind == "object":
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Not valid JSON: {exc.msg}.") from None
        if not isinstance(value, dict):
            raise ValueError("Give a JSON object.")
        return value
    if kind in ("int", "float"):  # with words
        if raw.lower() in p["words"]:
            return raw.lower()
        if kind == "int" and raw.isdecimal():  # isdigit() passes "¹", which int() refuses
            return int(raw)
        if kind == "float":
            try:
                return float(raw)
            except ValueError:
                pass
        words = " or ".join(f"'{w}'" for w in p["words"])
        positive = "positive " if (p.get("min") or 0) > 0 else ""
        raise ValueError(f"A {positive}{'whole ' if kind == 'int' else ''}number, or {words}.")
    return raw


def op_form(op: str, adapter, data=None) -> OpForm | None:
    """The form of `op` on `adapter`'s page, or None when no op has that name."""
    spec = opspecs.OPS.get(op) if isinstance(op, str) else None
    return OpForm(data, spec=spec.describe(), adapter=adapter) if spec else None


def op_panels(adapter) -> list[dict]:
    """Every op panel of the adapter page, in the declarations' order."""
    return [{"op": name, "form": op_form(name, adapter)} for name in opspecs.OPS]
