"""Every public library function that takes an adapter takes an Adapter or a PEFT folder, through
the one rule `adapters_ops.adapter.as_adapter` (its annotation says so: AdapterLike)."""

from __future__ import annotations

import inspect

import pytest

from adapters_ops import compeft, compose, evaluate, merge, moving, qalora, scale, transfer, translora
from adapters_ops.adapter import Adapter, as_adapter
from adapters_ops.errors import AdapterError

MODULES = [compeft, compose, evaluate, merge, moving, qalora, scale, transfer, translora]
ACCEPTED = ("AdapterLike", "Adapter | str | os.PathLike")


def entry_points():
    for module in MODULES:
        for name, fn in vars(module).items():
            # a package's entry points live in its submodules (adapters_ops.qalora.model, ...)
            home = fn.__module__ if inspect.isfunction(fn) else ""
            if name.startswith("_") or not (home == module.__name__ or home.startswith(module.__name__ + ".")):
                continue
            for param in ("adapter", "adapters"):
                if param in inspect.signature(fn).parameters:
                    yield f"{module.__name__}.{name}", fn, param


def test_there_are_entry_points_to_check():
    assert len(list(entry_points())) >= 20


@pytest.mark.parametrize("qualname,fn,param", list(entry_points()), ids=lambda x: x if isinstance(x, str) else "")
def test_entry_point_annotation_accepts_folders(qualname, fn, param):
    annotation = str(inspect.signature(fn).parameters[param].annotation)
    assert any(a in annotation for a in ACCEPTED), f"{qualname}({param}: {annotation}) takes no folder"


def test_as_adapter_loads_folders_and_refuses_other_things(tmp_path):
    import torch

    a = Adapter({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]},
                {"base_model.model.q_proj.lora_A.weight": torch.ones(2, 4),
                 "base_model.model.q_proj.lora_B.weight": torch.ones(4, 2)})
    assert as_adapter(a) is a
    a.save(tmp_path / "a")
    assert as_adapter(str(tmp_path / "a")).tensors.keys() == a.tensors.keys()
    with pytest.raises(AdapterError) as info:
        as_adapter(tmp_path / "missing")
    assert info.value.code == "missing_config"
    with pytest.raises(AdapterError) as info:
        as_adapter(42)
    assert info.value.code == "invalid_adapter"
