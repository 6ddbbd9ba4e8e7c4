"""One declaration per op drives every surface: `GET /api/v1/ops`, the CLI's
flags and help, the UI's job form, the OpenAPI schema and docs/cli.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_docs_op_table_is_generated_from_the_declarations():
    from hub.cli import ops

    doc = (ROOT / "docs" / "cli.md").read_text()
    assert doc == ops.with_table(doc, ops.local_ops()), "stale: run python -m hub.cli.ops docs/cli.md"


@pytest.fixture
def declared_clip(monkeypatch):
    """The scale op with one more parameter, as a hub that grew it would declare it."""
    from adapters_ops import opspecs

    spec = opspecs.OPS["scale"]
    clip = opspecs.Param("clip_norm", "float", "cap each module's update norm after scaling", min=0.0, max=50.0)
    monkeypatch.setitem(opspecs.OPS, "scale", dataclasses.replace(spec, params=spec.params + (clip,)))
    return clip


@pytest.mark.django_db(transaction=True)
def test_a_new_parameter_shows_in_the_cli_the_ui_and_the_schema(declared_clip, live_server, user):
    import os
    import subprocess
    import sys

    from django.test import Client

    from tests.frontend.conftest import make_adapter, make_base

    # REST: the hub declares it
    c = Client()
    scale = next(o for o in c.get("/api/v1/ops").json() if o["name"] == "scale")
    assert {"name": "clip_norm", "type": "float", "min": 0.0, "max": 50.0}.items() <= scale["params"][-1].items()

    # hubctl, in a process of its own whose installed declarations lack the parameter: it takes
    # its flags from the hub's answer (and without a hub, from its own declarations)
    env = {**os.environ, "HUB_URL": live_server.url, "HUB_TOKEN": "unused"}
    help_text = subprocess.run([sys.executable, "-m", "hub.cli.main", "scale", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60).stdout
    assert "--clip-norm X" in help_text and "cap each module's update norm" in help_text
    offline = subprocess.run([sys.executable, "-m", "hub.cli.main", "scale", "--help"], cwd=ROOT,
                             env={**env, "HUB_URL": "http://127.0.0.1:9"}, capture_output=True, text=True,
                             timeout=60).stdout
    assert "--factor" in offline and "--clip-norm" not in offline

    # the UI's job form
    make_adapter(user.username, "lora", make_base("b"), user=user)
    c.force_login(user)
    page = c.get(f"/adapters/{user.username}/lora/").content.decode()
    panel = page.split('id="op-scale"', 1)[1].split("</details>", 1)[0]
    assert 'name="scale-clip_norm"' in panel and "cap each module&#x27;s update norm" in panel

    # the OpenAPI schema: a params component per op, and the job request takes any of them
    schema = c.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    props = schema["components"]["schemas"]["ScaleParams"]["properties"]
    assert props["clip_norm"] == {"type": "number", "minimum": 0.0, "maximum": 50.0,
                                  "description": "cap each module's update norm after scaling"}
    body = schema["components"]["schemas"]["JobCreateRequest"]["properties"]["params"]
    assert {"$ref": "#/components/schemas/ScaleParams"} in body["anyOf"]


def test_op_flags_follow_the_declaration_types():
    from hub.cli import main as cli
    from hub.cli import ops

    parser = cli.build_parser(ops.local_ops())
    args = parser.parse_args(["compress", "alice/a", "--density", "0.2", "--no-tune-scale", "--magnitude-bits", "2"])
    assert ops.params_of(args, args.op) == {"adapter": "alice/a", "density": 0.2, "tune_scale": False,
                                            "magnitude_bits": 2}
    args = parser.parse_args(["transfer", "--from", "a", "--to", "b"])  # its own command
    assert args.func is cli.jobs.cmd_transfer
    for bad in (["compress", "alice/a", "--density", "2"], ["quantize", "alice/a", "--bits", "5"],
                ["merge", "a/b", "a/c", "--name", "a/m", "--rank", "0"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(bad)
        assert info.value.code == 1
