"""`GET /api/v1/ops`: every op this hub runs, with its parameters as data
(adapters_ops.opspecs). `hubctl` builds its op commands from this answer and
the UI its job forms from the same declarations; the OpenAPI schema gets one
`<Op>Params` component per op from them too (`params_schemas`)."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import permissions, serializers
from rest_framework.response import Response

from adapters_ops import opspecs
from hub.api.base import ApiView

_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "repo": "string",
               "ref": "string", "base": "string", "repos": "array", "floats": "array", "strs": "array",
               "object": "object"}
_ITEM_TYPES = {"repos": "string", "floats": "number", "strs": "string"}


def describe_ops() -> list[dict]:
    return [spec.describe() for spec in opspecs.OPS.values()]


class OpList(ApiView):
    permission_classes = [permissions.AllowAny]

    @extend_schema(responses=inline_serializer("Op", {
        "name": serializers.CharField(), "title": serializers.CharField(), "summary": serializers.CharField(),
        "queue": serializers.CharField(), "produces": serializers.ListField(child=serializers.CharField()),
        "card_relation": serializers.CharField(), "writes": serializers.CharField(allow_null=True),
        "reads": serializers.ListField(child=serializers.CharField()),
        "creates": serializers.CharField(allow_null=True), "bases": serializers.ListField(child=serializers.CharField()),
        "needs_seeds": serializers.JSONField(),
        "params": serializers.ListField(child=serializers.DictField(), help_text="name, type, help, label, required, "
                                        "default, choices, words, min, max, min_items, max_items, fields"),
    }, many=True))
    def get(self, request):
        return Response(describe_ops())


def param_schema(p: dict) -> dict:
    """JSON Schema of one parameter, from its `describe()` form."""
    if p["type"] == "choice":
        out = {"enum": p["choices"]}
    else:
        out = {"type": _JSON_TYPES[p["type"]]}
    if p.get("words"):  # a number or one of its words
        out = {"oneOf": [out, {"type": "string", "enum": p["words"]}]}
    for key, name in (("min", "minimum"), ("max", "maximum")):
        if key in p and p["type"] in ("int", "float"):
            (out["oneOf"][0] if "oneOf" in out else out)[name] = p[key]
    if p["type"] in _ITEM_TYPES:
        out.update(items={"type": _ITEM_TYPES[p["type"]]}, minItems=p["min_items"], maxItems=p["max_items"])
    if p["type"] == "object":
        out.update(properties={f["name"]: param_schema(f) for f in p["fields"]}, additionalProperties=False)
    if "default" in p:
        out["default"] = p["default"]
    out["description"] = p["help"]
    return out


def params_schemas(result, generator, request, public):
    """drf-spectacular postprocessing hook: an `<Op>Params` component per op,
    and the job request's `params` as any of them."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    refs = []
    for op in describe_ops():
        name = "".join(w.capitalize() for w in op["name"].split("_")) + "Params"
        schemas[name] = {
            "type": "object", "description": f"params of op `{op['name']}`: {op['summary']}",
            "properties": {p["name"]: param_schema(p) for p in op["params"]}, "additionalProperties": False,
        }
        required = [p["name"] for p in op["params"] if p["required"]]
        if required:  # OpenAPI 3.0 wants a non-empty list or none
            schemas[name]["required"] = required
        refs.append({"$ref": f"#/components/schemas/{name}"})
    request_body = schemas.get("JobCreateRequest", {}).get("properties", {})
    if "params" in request_body:
        request_body["params"] = {"anyOf": refs, "description": "the op's parameters (GET /api/v1/ops)"}
    return result
