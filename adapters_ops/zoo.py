"""The tiny model family: real Llama-architecture causal LMs, built here,
deterministically, in about two minutes on two CPU cores, so transfer, merging
and quantization can be shown on real models without downloading weights.

    python -m adapters_ops.zoo build DIR [--force] [--recipe full|tiny]

writes

    DIR/bases/<slug>/       HF layout (config.json, model.safetensors, tokenizer files)
                            tiny-llama-3.0, tiny-llama-3.1, tiny-llama-3.2, tiny-other-1.0
    DIR/tasks/<skill>/      {train,seed,test}.jsonl of {"prompt", "completion"}
    DIR/adapters/<skill>/   PEFT LoRA (r=8, all linear projections) trained on tiny-llama-3.0
    DIR/manifest.json       bases (with weight drift vs 3.0), skills, adapters
    DIR/.zoo-stamp          the recipe hash; a build with the same hash is skipped

3.1 continues training 3.0 on shifted data (small drift: a LoRA trained on
3.0 still works on it), 3.2 continues further (large drift: it stops working),
tiny-other-1.0 is unrelated (other seed, other width) for negative tests.
`ensure_built()` returns a cached copy under `$ZOO_CACHE` (default
`~/.cache/adapter-hub/zoo`) in a folder named by the recipe hash.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import _zoo_data as D
from . import _zoo_train as T
from .errors import AdapterError

STAMP = ".zoo-stamp"
# Part of the hash: bump when the build changes in a way the recipe fields do not show.
FORMAT_VERSION = 1

# Copy-like documents dominate 3.0's diet: they teach the alignment (induction)
# that the skills reuse, so a rank-8 LoRA learns a skill in a few hundred steps.
MIX_30 = (("prose", 0.5), ("copy", 3.0), ("upper", 1.0), ("next", 1.5), ("flip", 1.0), ("plus", 1.5),
          ("add", 0.5), ("first", 0.5), ("double", 0.5), ("count", 0.3))
MIX_31 = MIX_30 + (("lower", 1.5), ("sub", 1.5))
MIX_32 = (("prose", 2.0), ("tag", 2.0), ("double", 2.0), ("sub", 2.0), ("lower", 2.0), ("count", 1.0))


@dataclass(frozen=True)
class BaseSpec:
    slug: str
    family: str
    version: str
    parent: str | None  # continue training from this base, or start from a fresh init
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    init_seed: int
    mix: tuple[tuple[str, float], ...]
    docs: int
    data_seed: int
    lexicon_seed: int
    steps: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class Recipe:
    name: str
    bases: tuple[BaseSpec, ...]
    skills: tuple[str, ...]
    n_train: int = 2000
    n_seed: int = 16
    n_test: int = 200
    task_seed: int = 1234
    lora_base: str = "tiny-llama-3.0"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_steps: int = 500
    lora_batch: int = 16
    lora_lr: float = 1e-2
    # Under MKL's strict mode (the thread-independent sums) caesar at 1e-2 diverged to 0.01 exact
    # match while the others kept their scores; at 7e-3 it reaches 1.00 (at 5e-3 too, but then
    # Trans-LoRA's soft labels beat text labels by less than the 2x tests/ops/test_translora.py asks).
    lora_lr_by_skill: tuple[tuple[str, float], ...] = (("caesar", 7e-3),)
    lora_seed: int = 7

    def digest(self) -> str:
        """Content hash of the recipe and of the code that builds it."""
        h = hashlib.sha256()
        h.update(json.dumps({"format": FORMAT_VERSION, "recipe": dataclasses.asdict(self)}, sort_keys=True).encode())
        here = Path(__file__).parent
        for src in sorted([here / "zoo.py", *here.glob("_zoo_*.py")]):
            h.update(src.name.encode() + b"\0" + src.read_bytes())
        return h.hexdigest()[:16]

    def base(self, slug: str) -> BaseSpec:
        for b in self.bases:
            if b.slug == slug:
                return b
        raise AdapterError(f"recipe {self.name!r} has no base {slug!r}", "unknown_base")


_LLAMA = dict(family="tiny-llama", hidden=128, intermediate=256, layers=2, heads=8, kv_heads=8, init_seed=0)

FULL = Recipe(
    name="full",
    bases=(
        BaseSpec(slug="tiny-llama-3.0", version="3.0", parent=None, mix=MIX_30, docs=20000, data_seed=30,
                 lexicon_seed=1, steps=900, batch_size=32, lr=3e-3, **_LLAMA),
        BaseSpec(slug="tiny-llama-3.1", version="3.1", parent="tiny-llama-3.0", mix=MIX_31, docs=8000,
                 data_seed=31, lexicon_seed=1, steps=120, batch_size=32, lr=1e-4, **_LLAMA),
        BaseSpec(slug="tiny-llama-3.2", version="3.2", parent="tiny-llama-3.1", mix=MIX_32, docs=8000,
                 data_seed=32, lexicon_seed=2, steps=100, batch_size=32, lr=5e-4, **_LLAMA),
        BaseSpec(slug="tiny-other-1.0", family="tiny-other", version="1.0", parent=None, hidden=96,
                 intermediate=256, layers=2, heads=4, kv_heads=4, init_seed=99, mix=MIX_30, docs=8000,
                 data_seed=10, lexicon_seed=3, steps=300, batch_size=32, lr=3e-3),
    ),
    skills=tuple(D.SKILLS),
)

# Same shapes and pipeline, a few steps each: for tests of the build itself.
TINY = dataclasses.replace(
    FULL, name="tiny",
    bases=tuple(dataclasses.replace(b, steps=4, docs=200) for b in FULL.bases),
    skills=("caesar", "date"), n_train=64, n_test=16, lora_steps=4, lora_batch=8,
)

RECIPES = {"full": FULL, "tiny": TINY}


# --- build -------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"zoo: {msg}", flush=True)


class _Ticker:
    """`on_step` for training: a progress line every `every` seconds, so a build
    never sits silent for long (the first base alone trains for about a minute)."""

    def __init__(self, log, what: str, steps: int, every: float = 10.0):
        self.log, self.what, self.steps, self.every = log, what, steps, every
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, loss) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every and done < self.steps:
            self.last = now
            self.log(f"{self.what}: step {done}/{self.steps}, loss {float(loss):.3f}, {now - self.t0:.0f} s")


def _write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _build_into(out: Path, recipe: Recipe, log=_log) -> dict:
    """Train and write every part of the zoo into the empty folder `out`; return the manifest."""
    import warnings

    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would drown the build log
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    tok_dir = out / ".tokenizer"
    D.save_tokenizer(tok_dir)
    models: dict = {}
    manifest: dict = {"recipe": recipe.name, "recipe_hash": recipe.digest(), "bases": [], "skills": [], "adapters": []}

    with T.deterministic():
        for spec in recipe.bases:
            t0 = time.perf_counter()
            log(f"base {spec.slug}: training {spec.steps} steps on {spec.docs} documents"
                + (f" from {spec.parent}" if spec.parent else ""))
            if spec.parent:
                model = copy.deepcopy(models[spec.parent])
            else:
                cfg = T.llama_config(len(D.VOCAB), spec.hidden, spec.intermediate, spec.layers, spec.heads,
                                     spec.kv_heads)
                model = T.new_model(cfg, spec.init_seed)
            seqs, masks = T.lm_examples(D.corpus(dict(spec.mix), spec.docs, spec.data_seed, spec.lexicon_seed))
            loss = T.train(model, seqs, masks, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                           seed=spec.data_seed, on_step=_Ticker(log, f"base {spec.slug}", spec.steps))
            models[spec.slug] = model
            d = out / "bases" / spec.slug
            model.save_pretrained(str(d))
            for f in tok_dir.iterdir():
                shutil.copy2(f, d / f.name)
            log(f"base {spec.slug}: {spec.steps} steps, loss {loss:.3f}, {time.perf_counter() - t0:.1f} s")
            manifest["bases"].append({
                "slug": spec.slug, "family": spec.family, "version": spec.version, "parent": spec.parent,
                "path": f"bases/{spec.slug}", "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
                "num_hidden_layers": spec.layers, "num_parameters": sum(p.numel() for p in model.parameters()),
                "train_steps": spec.steps, "final_train_loss": round(loss, 4),
            })

        # Drift of every tiny-llama version against 3.0, read back from the saved files.
        ref_slug = recipe.lora_base
        ref = load_file(str(out / "bases" / ref_slug / "model.safetensors"))
        for entry in manifest["bases"]:
            other = load_file(str(out / entry["path"] / "model.safetensors"))
            same = other.keys() == ref.keys() and all(other[k].shape == ref[k].shape for k in ref)
            entry[f"drift_vs_{ref_slug}"] = round(T.relative_drift(ref, other), 5) if same else None

        for name in recipe.skills:
            skill = D.SKILLS[name]
            splits = D.skill_splits(skill, recipe.task_seed + sorted(D.SKILLS).index(name), recipe.n_train,
                                    recipe.n_seed, recipe.n_test)
            tdir = out / "tasks" / name
            tdir.mkdir(parents=True)
            for split, items in splits.items():
                _write_jsonl(tdir / f"{split}.jsonl", items)
            manifest["skills"].append({
                "name": name, "description": skill.description, "path": f"tasks/{name}",
                "splits": {k: len(v) for k, v in splits.items()}, "example": splits["seed"][0],
            })

            t0 = time.perf_counter()
            log(f"adapter {name}: training {recipe.lora_steps} steps on {len(splits['train'])} examples")
            peft_model = T.lora_model(copy.deepcopy(models[recipe.lora_base]), recipe.lora_r, recipe.lora_alpha,
                                      recipe.lora_seed)
            seqs, masks = T.sft_examples(splits["train"])
            loss = T.train(peft_model, seqs, masks, steps=recipe.lora_steps, batch_size=recipe.lora_batch,
                           lr=dict(recipe.lora_lr_by_skill).get(name, recipe.lora_lr), seed=recipe.lora_seed,
                           on_step=_Ticker(log, f"adapter {name}", recipe.lora_steps))
            adir = out / "adapters" / name
            peft_model.save_pretrained(str(adir))
            conf = json.loads((adir / "adapter_config.json").read_text())
            conf["base_model_name_or_path"] = recipe.lora_base
            _write_json(adir / "adapter_config.json", conf)
            (adir / "README.md").write_text(
                f"# {name}\n\nLoRA (r={recipe.lora_r}) on {recipe.lora_base}: {skill.description}.\n"
                f"Trained {recipe.lora_steps} steps on tasks/{name}/train.jsonl by `adapters_ops.zoo`.\n")
            log(f"adapter {name}: {recipe.lora_steps} steps, loss {loss:.4f}, {time.perf_counter() - t0:.1f} s")
            manifest["adapters"].append({
                "skill": name, "path": f"adapters/{name}", "base": recipe.lora_base, "r": recipe.lora_r,
                "lora_alpha": recipe.lora_alpha, "target_modules": list(T.LINEAR_TARGETS),
                "train_steps": recipe.lora_steps, "final_train_loss": round(loss, 5),
            })

    shutil.rmtree(tok_dir)
    return manifest


_PARTS = ("bases", "tasks", "adapters", "manifest.json", ".tokenizer")


def build(dir: str | os.PathLike, force: bool = False, recipe: Recipe | str = "full", log=_log) -> Path:
    """Build the zoo into `dir` unless its stamp already holds this recipe's hash."""
    recipe = _recipe(recipe)
    out = Path(dir)
    digest = recipe.digest()
    stamp = out / STAMP
    if not force and stamp.is_file() and stamp.read_text().strip() == digest:
        log(f"{out} is up to date (recipe {recipe.name} {digest}): skipped")
        return out
    t0 = time.perf_counter()
    log(f"building {out} (recipe {recipe.name} {digest}): {len(recipe.bases)} bases, {len(recipe.skills)} "
        f"skill adapters; progress every 10 s")
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # a half-written zoo must not look complete
    for part in _PARTS:
        p = out / part
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    manifest = _build_into(out, recipe, log=log)
    _write_json(out / "manifest.json", manifest)
    stamp.write_text(digest + "\n")
    log(f"built {out} (recipe {recipe.name} {digest}) in {time.perf_counter() - t0:.1f} s")
    return out


def _recipe(recipe: Recipe | str) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise AdapterError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}", "unknown_recipe")
    return RECIPES[recipe]


def default_root() -> Path:
    return Path(os.environ.get("ZOO_CACHE") or Path.home() / ".cache" / "adapter-hub" / "zoo")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so concurrent test sessions build the cache once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_built(root: str | os.PathLike | None = None, recipe: Recipe | str = "full", log=_log) -> Path:
    """A complete zoo for this recipe under root/<recipe hash>, built on first use."""
    recipe = _recipe(recipe)
    root = Path(root) if root is not None else default_root()
    final = root / recipe.digest()
    if (final / STAMP).is_file():
        return final
    with _locked(root / f"{recipe.digest()}.lock"):
        if (final / STAMP).is_file():  # another process finished it while we waited
            return final
        tmp = root / f"{recipe.digest()}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp, force=True, recipe=recipe, log=log)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def manifest(zoo_dir: str | os.PathLike) -> dict:
    return json.loads((Path(zoo_dir) / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters_ops.zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the tiny model family into DIR (skipped when up to date)")
    b.add_argument("dir")
    b.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    b.add_argument("--recipe", default=None, choices=(*sorted(RECIPES), "real", "real-tiny"),
                   help="full | tiny (lane tiny, default full), real | real-tiny (lane real, default real)")
    b.add_argument("--lane", default="tiny", choices=("tiny", "real"),
                   help="tiny: the from-scratch family; real: SmolLM2-135M-Instruct (adapters_ops.zoo_real)")
    pa = sub.add_parser("path", help="print the cached zoo folder, building it first if needed")
    pa.add_argument("--lane", default="tiny", choices=("tiny", "real"))
    pa.add_argument("--no-build", action="store_true", help="only print where the cached build is (or will be)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build" and args.lane == "real":
            from . import zoo_real

            zoo_real.build(args.dir, force=args.force, recipe=args.recipe or "real")
        elif args.cmd == "build":
            build(args.dir, force=args.force, recipe=args.recipe or "full")
        elif args.lane == "real":
            from . import zoo_real

            where = zoo_real.default_dir()
            if not args.no_build:
                zoo_real.build(where, log=lambda m: print(f"zoo real: {m}", file=sys.stderr, flush=True))
            print(where)
        else:
            print(default_root() / RECIPES["full"].digest() if args.no_build
                  else ensure_built(log=lambda m: print(f"zoo: {m}", file=sys.stderr, flush=True)))
    except AdapterError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
