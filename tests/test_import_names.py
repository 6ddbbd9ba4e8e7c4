"""No import name of ours may shadow a distribution in our dependency tree.

transformers >= 5.25 imports Hugging Face's `kernels` package; our Triton folder used to be
the top-level package `kernels` and broke every `import transformers` run from the repository
root. These tests compare every installed distribution's top-level names (top_level.txt, or its
RECORD) with the names our code exposes, both as installed and as seen from the repository root
(where manage.py, pytest and hubctl run with the root on sys.path).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_DISTRIBUTION = "adapter-hub"
# RECORD entries that are not importable names: scripts, metadata, caches, bundled libraries.
_NOT_NAMES = ("..", "__pycache__")
_NOT_SUFFIXES = (".dist-info", ".data", ".libs", ".pth", ".egg-info")


def _module_name(entry: str) -> str | None:
    if entry in _NOT_NAMES or entry.endswith(_NOT_SUFFIXES) or entry.startswith("__editable__"):
        return None
    for suffix in (".py", ".pyc"):
        if entry.endswith(suffix):
            return entry[: -len(suffix)]
    if entry.endswith((".so", ".pyd")):
        return entry.split(".", 1)[0]
    return entry if "." not in entry else None


def distribution_names(dist: md.Distribution) -> set[str]:
    """The top-level import names a distribution installs."""
    listed = dist.read_text("top_level.txt")
    entries = listed.split() if listed else [f.parts[0] for f in dist.files or [] if f.parts]
    return {name for name in map(_module_name, entries) if name}


def third_party_names() -> dict[str, set[str]]:
    """Import name -> the installed distributions (ours excluded) that provide it."""
    owners: dict[str, set[str]] = {}
    for dist in md.distributions():
        dist_name = dist.metadata["Name"]
        if dist_name is None or _normal(dist_name) == _normal(OUR_DISTRIBUTION):
            continue
        for name in distribution_names(dist):
            owners.setdefault(name, set()).add(dist_name)
    return owners


def our_names() -> set[str]:
    """What our code makes importable: the installed packages, and the regular packages and
    modules at the repository root (on sys.path when running manage.py, pytest or hubctl here)."""
    names = distribution_names(md.distribution(OUR_DISTRIBUTION))
    for path in ROOT.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            names.add(path.name)
        elif path.suffix == ".py":
            names.add(path.stem)
    return names


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def test_our_names_are_the_expected_ones():
    # Guards the helpers themselves: if this set goes empty, the clash test below asserts nothing.
    assert {"hub", "workers", "adapters_ops", "adapter_kernels", "frontend"} <= our_names()
    assert "kernels" not in our_names()


def test_no_name_of_ours_shadows_an_installed_distribution():
    owners = third_party_names()
    assert "transformers" in owners and "torch" in owners  # the scan reads real distributions
    clashes = {name: sorted(owners[name]) for name in our_names() & owners.keys()}
    assert not clashes, f"import names of ours that shadow installed distributions: {clashes}"


def test_every_third_party_name_resolves_outside_the_repository():
    """A name that a distribution provides must import from that distribution, not from a
    folder of ours: this also catches a shadowing path that is not one of our packages."""
    shadowed = {}
    for name, dists in third_party_names().items():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origins = [spec.origin] if spec and spec.origin else list(spec.submodule_search_locations or []) if spec else []
        inside = [o for o in origins if o and Path(o).resolve().is_relative_to(ROOT)
                  and not Path(o).resolve().is_relative_to(Path(sys.prefix).resolve())]
        if inside:
            shadowed[name] = (sorted(dists), inside)
    assert not shadowed, f"names that import from the repository instead of their distribution: {shadowed}"


def test_transformers_peft_and_our_kernels_in_one_interpreter():
    """The original break, from the repository root as manage.py runs: `import transformers`
    reaches `transformers.integrations.hub_kernels`, which imports Hugging Face's `kernels`."""
    code = (
        "import transformers.integrations.hub_kernels, peft, kernels\n"
        "from transformers import AutoModelForCausalLM\n"
        "from adapter_kernels import int4, ternary\n"
        "import adapters_ops.compeft, adapters_ops.merge\n"
        "print(kernels.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not Path(done.stdout.strip()).resolve().is_relative_to(ROOT / "kernels")
