"""The default name of a transferred adapter (workers.ops.transfer.default_name):
the target's slug replaces the one an earlier transfer appended, so names do
not stack up over a chain of base versions."""

import pytest


def default_name(*args):
    # imported when a test runs: importing the worker app at collection would fix its routes
    # before the session registers the test ops
    from workers.ops.transfer import default_name as name

    return name(*args)


@pytest.mark.parametrize("repo, target, source, expected", [
    ("demo/caesar", "tiny-llama-3.1", "tiny-llama-3.0", "demo/caesar-tiny-llama-3.1"),
    # the second hop of 3.0 -> 3.1 -> 3.2 is named by the family's new version only
    ("demo/caesar-tiny-llama-3.1", "tiny-llama-3.2", "tiny-llama-3.1", "demo/caesar-tiny-llama-3.2"),
    # and back again
    ("demo/caesar-tiny-llama-3.2", "tiny-llama-3.1", "tiny-llama-3.2", "demo/caesar-tiny-llama-3.1"),
    # a name that only looks like a slug keeps it: nothing would be left
    ("demo/tiny-llama-3.1", "tiny-llama-3.2", "tiny-llama-3.1", "demo/tiny-llama-3.1-tiny-llama-3.2"),
    # other suffixes are the owner's choice and stay
    ("alice/math-v2", "tiny-llama-3.1", "tiny-llama-3.0", "alice/math-v2-tiny-llama-3.1"),
    ("alice/lora", "tiny-base-2", "", "alice/lora-tiny-base-2"),
])
def test_default_name(repo, target, source, expected):
    assert default_name(repo, target, source) == expected


def test_default_name_fits_the_name_limit():
    name = default_name("demo/" + "x" * 96, "tiny-llama-3.2", "tiny-llama-3.1").split("/", 1)[1]
    assert len(name) == 96 and name.endswith("-tiny-llama-3.2")
