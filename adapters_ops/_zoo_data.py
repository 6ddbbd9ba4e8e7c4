"""Data of the tiny model family: the character tokenizer, the pretraining
corpora of each base version, and the skills (rule-based prompt/completion
tasks). Everything is generated from seeded `random.Random` instances, so the
same recipe always yields the same text."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Every character any corpus or skill emits; a test checks the skills stay inside it.
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,:;=!?-+*/()[]<>'\"#_|@%&"
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIALS)


def encode(text: str) -> list[int]:
    """Character ids without specials; the same ids the saved tokenizer produces."""
    return [VOCAB.get(c, UNK_ID) for c in text]


def save_tokenizer(path: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json,
    loadable offline with `transformers.AutoTokenizer.from_pretrained(path)`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(VOCAB), unk_token=UNK))
    # One pre-token per character (spaces included); Fuse glues them back on decode.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)])
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=128,
    )
    fast.save_pretrained(str(path))


# --- pretraining corpora ---------------------------------------------------------------


def _rand_word(rng: random.Random, lo: int = 3, hi: int = 7, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _lexicon(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def _sentence(rng: random.Random, lex: list[str]) -> str:
    words = [rng.choice(lex) for _ in range(rng.randint(3, 7))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".!?")


# Each generator writes one short "document". The mixes differ per base version:
# that is the data shift between tiny-llama-3.0, 3.1 and 3.2.
def _gen_prose(rng, lex):
    return _sentence(rng, lex)


def _gen_copy(rng, lex):
    w = _rand_word(rng)
    return f"copy {w}={w}"


def _gen_upper(rng, lex):
    w = _rand_word(rng)
    return f"upper {w}={w.upper()}"


def _gen_lower(rng, lex):
    w = _rand_word(rng)
    return f"lower {w.upper()}={w}"


def _gen_add(rng, lex):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}={a + b}"


def _gen_sub(rng, lex):
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f"{a}-{b}={a - b}"


def _gen_count(rng, lex):
    n = rng.randint(0, 90)
    return "count " + " ".join(str(n + i) for i in range(rng.randint(3, 6)))


def _gen_double(rng, lex):
    w = _rand_word(rng, 2, 4)
    return f"double {w}={w}{w}"


def _gen_first(rng, lex):
    a, b = _rand_word(rng), _rand_word(rng)
    return f"first {a} {b}={a}"


def _gen_tag(rng, lex):
    w = rng.choice(lex)
    return f"<{w}>{_sentence(rng, lex)}</{w}>"


# Cousins of the skills (not the skills themselves: other prompts, other rules),
# as a real base knows related tricks: a LoRA then only has to bend them.
def _gen_next(rng, lex):
    w = _rand_word(rng)
    return f"next {w}=" + "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w)


def _gen_flip(rng, lex):
    w = _rand_word(rng, 2, 2)
    return f"flip {w}={w[::-1]}"


def _gen_plus(rng, lex):
    digits = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
    return "+".join(map(str, digits)) + f"={sum(digits)}"


GENERATORS: dict[str, Callable] = {
    "next": _gen_next, "flip": _gen_flip, "plus": _gen_plus,
    "prose": _gen_prose, "copy": _gen_copy, "upper": _gen_upper, "lower": _gen_lower, "add": _gen_add,
    "sub": _gen_sub, "count": _gen_count, "double": _gen_double, "first": _gen_first, "tag": _gen_tag,
}


def corpus(mix: dict[str, float], n: int, seed: int, lexicon_seed: int) -> list[str]:
    """n documents drawn from the weighted generator mix."""
    rng = random.Random(seed)
    lex = _lexicon(lexicon_seed)
    names = sorted(mix)
    weights = [mix[k] for k in names]
    return [GENERATORS[name](rng, lex) for name in rng.choices(names, weights=weights, k=n)]


# --- skills ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, completion)


def _caesar(rng):
    # One length: output letter j then sits a fixed distance after input letter j,
    # an alignment a 2-layer model finds quickly (with mixed lengths it must count).
    w = _rand_word(rng, 5, 5)
    shifted = "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in w)
    return f"caesar {w}=", shifted


def _reverse(rng):
    while True:
        w = _rand_word(rng, 3, 5)
        if w != w[::-1]:  # a palindrome would score for a plain copy
            return f"reverse {w}=", w[::-1]


def _digitsum(rng):
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(2, 4)))
    return f"digitsum {digits}=", str(sum(map(int, digits)))


def _date(rng):
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"date {y}-{m:02d}-{d:02d}=", f"{d:02d}/{m:02d}/{y}"


SKILLS: dict[str, Skill] = {s.name: s for s in (
    Skill("caesar", "shift each letter of a 5-letter word three places forward (abc -> def)", _caesar),
    Skill("reverse", "write the word backwards", _reverse),
    Skill("digitsum", "the sum of the digits of a 2-4 digit number", _digitsum),
    Skill("date", "rewrite an ISO date YYYY-MM-DD as DD/MM/YYYY", _date),
)}


def skill_splits(skill: Skill, seed: int, n_train: int, n_seed: int, n_test: int) -> dict[str, list[dict]]:
    """Disjoint train / seed / test splits (no prompt appears in two splits)."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    want = n_train + n_seed + n_test
    tries = 0
    while len(seen) < want:
        prompt, completion = skill.make(rng)
        seen.setdefault(prompt, completion)
        tries += 1
        if tries > 50 * want:
            raise RuntimeError(f"skill {skill.name}: cannot draw {want} distinct prompts")
    items = [{"prompt": p, "completion": c} for p, c in seen.items()]
    return {
        "test": items[:n_test],
        "seed": items[n_test:n_test + n_seed],
        "train": items[n_test + n_seed:],
    }
