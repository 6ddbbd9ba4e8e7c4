"""The op declarations (adapters_ops.opspecs): standard library only, and the
library's own vocabularies agree with them."""

from __future__ import annotations

import dataclasses

import pytest


def test_the_declarations_load_no_torch_and_no_django():
    from tests.web_process import forbidden_modules_after

    assert forbidden_modules_after("import adapters_ops.opspecs", django_setup=False, also=("django", "celery")) == []


def test_translora_settings_match_the_library_field_by_field():
    from adapters_ops import opspecs
    from adapters_ops.translora import TransLoraConfig

    fields = {f.name: f.default for f in dataclasses.fields(TransLoraConfig)}
    declared = {p.name: p.default for p in opspecs.TRANSLORA_FIELDS}
    assert declared == fields
    # every declared default builds a valid config, and the declared choices are the library's
    TransLoraConfig(**{k: v for k, v in declared.items() if v is not None})
    choices = {p.name: p.choices for p in opspecs.TRANSLORA_FIELDS if p.kind == "choice"}
    from adapters_ops.evaluate import SELECTIONS
    from adapters_ops.translora import DISCRIMINATORS, GENERATORS

    assert (choices["generator"], choices["discriminator"], choices["select"]) == (GENERATORS, DISCRIMINATORS,
                                                                                  SELECTIONS)


def test_merge_methods_match_the_library():
    from adapters_ops import opspecs
    from adapters_ops.merge import METHODS

    assert sorted(METHODS) == sorted(opspecs.MERGE_METHODS)
    assert opspecs.COMPOSE_METHODS == opspecs.MERGE_METHODS + ("distill",)


@pytest.mark.parametrize("settings,field", [
    ({"steps": 0}, "translora.steps"),
    ({"top_p": 1.5}, "translora.top_p"),
    ({"generator": "gpt"}, "translora.generator"),
    ({"filter": "yes"}, "translora.filter"),
    ({"target_modules": "q_proj"}, "translora.target_modules"),
])
def test_translora_settings_are_checked_at_submission(settings, field):
    from adapters_ops import opspecs
    from adapters_ops.errors import AdapterError
    from adapters_ops.translora import TransLoraConfig

    with pytest.raises(opspecs.ParamError) as info:
        opspecs.OPS["transfer"].clean({"adapter": "a/b", "target": "t", "translora": settings})
    assert info.value.field == field
    with pytest.raises(AdapterError):  # the library refuses the same value: the two rules agree
        TransLoraConfig(**settings)


def test_every_op_declares_what_the_registry_needs():
    from adapters_ops import opspecs
    from hub.registry.models import Revision

    for spec in opspecs.OPS.values():
        names = [p.name for p in spec.params]
        assert len(names) == len(set(names)), spec.name
        for key in (spec.writes, spec.creates, *spec.reads, *spec.bases):
            assert key is None or key in names, (spec.name, key)
        assert set(spec.produces) <= set(Revision.KINDS)
        spec.describe()  # JSON-able all the way down
    assert Revision.KINDS[0] == "upload" and "scale" in Revision.KINDS
