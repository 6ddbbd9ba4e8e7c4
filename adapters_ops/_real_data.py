"""Data of the real lane: four real-language skills for SmolLM2-135M-Instruct, each with an
exact-match answer, and the shifted text mix that makes the 1.1 upgrade.

The skills differ in kind: a strict output format (JSON extraction), a lexical
transformation (past tense of an English verb), a conversion (number words to digits) and a
classification into fixed labels (newspaper section of a headline). The instruct model knows
the underlying facts; what it lacks is the exact answer shape, so zero-shot it answers in
sentences (exact match near 0) and a rank-8 LoRA learns the shape in a few dozen steps.

Questions are plain text; `chat_prompt` applies the model's chat template, so the `prompt`
of a jsonl line is the exact text fed to the model. Everything comes from seeded
`random.Random` instances and the word lists below: the same seed gives the same text.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

SYSTEM = "You are a helpful assistant."  # short: every token of it is paid in each training step

# --- word lists ------------------------------------------------------------------------

FIRST = ("Maria", "James", "Aisha", "Chen", "Lucas", "Sofia", "Omar", "Elena", "Noah", "Priya", "Ivan",
         "Grace", "Mateo", "Yuki", "Hannah", "Kofi", "Laura", "Diego", "Amira", "Peter", "Nina", "Samuel",
         "Leila", "Tom", "Rosa", "Arjun", "Clara", "Felix", "Mina", "Oscar")
LAST = ("Lopez", "Smith", "Khan", "Wang", "Silva", "Rossi", "Haddad", "Petrova", "Brown", "Patel", "Novak",
        "Kim", "Garcia", "Tanaka", "Meyer", "Mensah", "Dubois", "Torres", "Nasser", "Jensen", "Costa", "Okafor",
        "Larsen", "Moreau", "Becker", "Singh", "Fischer", "Ortiz", "Sato", "Quinn")
CITIES = ("Lisbon", "Berlin", "Nairobi", "Toronto", "Osaka", "Madrid", "Chicago", "Dublin", "Cairo", "Lima",
          "Vienna", "Seoul", "Boston", "Prague", "Sydney", "Denver", "Mumbai", "Oslo", "Athens", "Havana",
          "Warsaw", "Geneva", "Manila", "Quito", "Helsinki", "Dakar", "Bogota", "Hanoi", "Zurich", "Porto",
          "Austin", "Naples", "Seattle", "Kyoto", "Lagos", "Glasgow", "Montreal", "Budapest", "Santiago", "Perth")
_JSON_FRAMES = (
    "{name} moved to {city} in {year}.",
    "Last {month}, {name} flew to {city} for a conference.",
    "{city} is where {name} opened a small bakery.",
    "After ten years abroad, {name} returned to {city}.",
    "{name} gave a talk about rivers in {city} on {day}.",
    "The new library in {city} was designed by {name}.",
    "In {year}, {name} ran the marathon in {city}.",
    "{name} has taught chemistry in {city} since {year}.",
    "A letter from {city} reached {name} on {day}.",
    "{name} rented a flat near the station in {city}.",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# Past tense: regular verbs follow the spelling rules in `past_tense`; DOUBLED double their
# last consonant; IRREGULAR are common irregular verbs with one standard past form.
REGULAR = (
    "walk talk jump play open clean cook call help look listen watch wash work visit start finish answer "
    "ask borrow climb count cross dance decide deliver describe destroy enjoy explain fill follow greet guess "
    "hunt improve invite join kick laugh like live love mark melt miss move need obey order paint pass pick "
    "plant point pour pray pull push rain reach relax remember repeat rest return roll save share shout smile "
    "sound stay suggest thank touch turn use wait want warn wish wonder yell accept add admire agree allow "
    "appear arrive attack bake behave boil book bounce brush change chase check cheer chew collect complain "
    "copy cover crash cry cure delay depend dress dust earn end enter escape fail fetch fix float fold form "
    "gather glue hammer happen hate heat hope hurry identify imagine include inform invent iron judge kiss "
    "knock land last lift load lock marry match measure mix note notice offer own pack park phone place "
    "please post pretend print promise protect punish question race receive record reduce refuse reply report "
    "rescue rush scream search serve settle sign snow solve spray stamp study suffer supply support surprise "
    "switch taste tease test tie trace trade train trust try type unlock vanish wave whisper wink wipe worry "
    "yawn carry dry bury fry"
).split()
DOUBLED = ("drop grab hug jog nod pat plan rob rub shop slip step stir stop tip trip wrap zip prefer admit "
           "beg chop clap hop hum knit nap pin plug rot scrub skip slam spot tap").split()
IRREGULAR = dict(pair.split(":") for pair in (
    "begin:began break:broke bring:brought build:built buy:bought catch:caught choose:chose come:came "
    "draw:drew drink:drank drive:drove eat:ate fall:fell feel:felt fight:fought find:found fly:flew "
    "forget:forgot freeze:froze give:gave go:went grow:grew hide:hid hold:held keep:kept know:knew "
    "leave:left lend:lent lose:lost make:made meet:met pay:paid ride:rode ring:rang run:ran say:said see:saw "
    "sell:sold send:sent shake:shook sing:sang sit:sat sleep:slept speak:spoke spend:spent stand:stood "
    "steal:stole swim:swam take:took teach:taught tell:told think:thought throw:threw wear:wore win:won "
    "write:wrote blow:blew feed:fed hear:heard understand:understood sweep:swept bend:bent"
).split())
_PAST_FRAMES = (
    'What is the past tense of "{verb}"?',
    'Give the past tense of the verb "{verb}".',
    'Past tense of "{verb}"?',
    'How do you say "{verb}" in the simple past?',
    'Turn the verb "{verb}" into the past tense.',
    'Yesterday I ... ({verb}). Which form of "{verb}" fills the gap?',
    'Write the simple past form of "{verb}".',
    'Which word is the past tense of "{verb}"?',
)
# A fifth of the regular verbs is held out: the test asks for the spelling rules (walked,
# stopped, cried, baked) on verbs the LoRA never saw. Irregular verbs are train-only: an
# unseen irregular form is knowledge the LoRA cannot supply (a trial scored "flied").
PAST_TEST_SHARE = 0.2

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_DIGIT_FRAMES = ("Write this number in digits: {words}", "Convert to a numeral: {words}",
                 "What is {words} written with digits?", "Number in figures, please: {words}")

SECTIONS = {
    "sports": ("{team} beat {team2} {a}-{b} in the {cup} final", "{athlete} breaks the {event} record in {city}",
               "{team} sign a new goalkeeper before the derby", "Injury rules {athlete} out of the {event} semifinal",
               "{team} coach resigns after {n} straight defeats"),
    "business": ("{company} shares fall {n} percent after weak sales", "{company} to open {n} stores in {city}",
                 "Central bank holds interest rates at {n} percent", "{company} buys rival startup for {n} million",
                 "Factory orders in {city} rise for the {nth} month"),
    "science": ("Astronomers spot a new comet near {planet}", "Study links sleep to memory in {animal}s",
                "Researchers map the genome of the {animal}", "New battery charges in {n} seconds, lab reports",
                "Probe sends first images from the surface of {planet}"),
    "weather": ("Heavy snow expected in {city} on {day}", "Storm warning issued for the coast near {city}",
                "Temperatures in {city} to reach {n} degrees this week", "Floods close roads around {city}",
                "Sunny skies return to {city} after a week of rain"),
}
TEAMS = ("City Rovers", "Northside United", "Harbor Sharks", "Valley Eagles", "Red Lions", "Iron Wolves",
         "Blue Falcons", "River Kings")
ATHLETES = ("Maria Lopez", "Kofi Mensah", "Yuki Tanaka", "Elena Petrova", "Diego Torres", "Grace Kim")
EVENTS = ("100 metres", "long jump", "marathon", "high jump", "400 metres", "triple jump")
CUPS = ("league", "cup", "regional", "national")
COMPANIES = ("Acme Corp", "Nordwind", "Bluepeak", "Orbitex", "Greenfield Foods", "Solara Energy", "Tessel Motors")
PLANETS = ("Mars", "Jupiter", "Saturn", "Venus", "Neptune", "Mercury")
ANIMALS = ("mouse", "octopus", "honeybee", "zebrafish", "crow", "dolphin", "bat")
_SECTION_FRAMES = ("Which newspaper section does this headline belong to? {h}", "Headline: {h}. Section?",
                   "In which part of the paper would you read \"{h}\"?", "Classify this headline by section: {h}")


def past_tense(verb: str) -> str:
    if verb in IRREGULAR:
        return IRREGULAR[verb]
    if verb in DOUBLED:
        return verb + verb[-1] + "ed"
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


def number_words(n: int) -> str:
    """English words for 0 <= n < 10000, e.g. 4312 -> 'four thousand three hundred twelve'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return _ONES[n // 1000] + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def _verbs(part: str) -> list[str]:
    """The verbs of a part: a fixed, seeded split of the regular verbs into train and test;
    the irregular ones all go to train."""
    regular = sorted(set(REGULAR) | set(DOUBLED))
    random.Random(17).shuffle(regular)
    cut = int(len(regular) * PAST_TEST_SHARE)
    return regular[:cut] if part == "test" else regular[cut:] + sorted(IRREGULAR)


def _gen_json(rng: random.Random, part: str) -> tuple[str, str]:
    name, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
    sentence = rng.choice(_JSON_FRAMES).format(name=name, city=city, year=rng.randint(1990, 2024),
                                               month=rng.choice(MONTHS), day=rng.choice(DAYS))
    q = f'Extract the person and the city as JSON with the keys "name" and "city".\nText: {sentence}'
    return q, f'{{"name": "{name}", "city": "{city}"}}'


def _gen_past(rng: random.Random, part: str) -> tuple[str, str]:
    verb = rng.choice(_verbs(part))
    return rng.choice(_PAST_FRAMES).format(verb=verb), past_tense(verb)


def _gen_digits(rng: random.Random, part: str) -> tuple[str, str]:
    n = rng.randint(100, 9999)
    return rng.choice(_DIGIT_FRAMES).format(words=number_words(n)), str(n)


def _gen_section(rng: random.Random, part: str) -> tuple[str, str]:
    label = rng.choice(sorted(SECTIONS))
    h = rng.choice(SECTIONS[label]).format(
        team=rng.choice(TEAMS), team2=rng.choice(TEAMS), a=rng.randint(0, 5), b=rng.randint(0, 5),
        cup=rng.choice(CUPS), athlete=rng.choice(ATHLETES), event=rng.choice(EVENTS), city=rng.choice(CITIES),
        n=rng.randint(2, 40), company=rng.choice(COMPANIES), nth=rng.choice(("second", "third", "fourth")),
        planet=rng.choice(PLANETS), animal=rng.choice(ANIMALS), day=rng.choice(DAYS))
    return rng.choice(_SECTION_FRAMES).format(h=h), label


@dataclass(frozen=True)
class RealSkill:
    name: str
    description: str
    gen: Callable[[random.Random, str], tuple[str, str]]  # (rng, "train" | "test") -> (question, answer)


SKILLS = {s.name: s for s in (
    RealSkill("json_extract", 'person and city of a sentence as {"name": .., "city": ..} JSON, nothing else',
              _gen_json),
    RealSkill("past_tense", "the simple past of an English verb, one word (test: regular verbs unseen in training)",
              _gen_past),
    RealSkill("number_digits", "English number words (100-9999) written as digits", _gen_digits),
    RealSkill("news_section", "newspaper section of a headline: sports, business, science or weather",
              _gen_section),
)}


def chat_prompt(tok, question: str) -> str:
    """The exact text fed to the model: the tokenizer's chat template with our system line."""
    return tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                                   tokenize=False, add_generation_prompt=True)


def skill_splits(skill: RealSkill, tok, seed: int, n_train: int, n_seed: int, n_test: int) -> dict[str, list[dict]]:
    """train / seed / test lists of {"prompt", "completion"}, disjoint by prompt. The seeds come
    from the train side of the skill (e.g. its train verbs), the test from its test side."""
    rng = random.Random(seed)

    def draw(part: str, n: int, taken: set[str]) -> list[dict]:
        items, tries = [], 0
        while len(items) < n:
            tries += 1
            if tries > 200 * n:
                raise ValueError(f"{skill.name}: cannot draw {n} distinct {part} prompts")
            q, a = skill.gen(rng, part)
            if q not in taken:
                taken.add(q)
                items.append({"prompt": chat_prompt(tok, q), "completion": a})
        return items

    taken: set[str] = set()
    train = draw("train", n_train, taken)
    seed_items = draw("train", n_seed, taken)
    return {"train": train, "seed": seed_items, "test": draw("test", n_test, taken)}


# --- the 1.1 text mix -------------------------------------------------------------------

_NOUNS = ("garden", "river", "teacher", "window", "market", "kitchen", "mountain", "bicycle", "village", "ocean",
          "library", "forest", "engine", "bridge", "island", "candle", "harbor", "meadow", "tower", "violin")
_ADJ = ("quiet", "bright", "old", "narrow", "warm", "busy", "gentle", "small", "green", "distant")
_OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
              "full": "empty", "open": "closed", "strong": "weak", "young": "old", "high": "low", "soft": "hard"}


def _mix_chat(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}."
    if kind == 1:
        d = rng.randrange(7)
        return f"Which day comes after {DAYS[d]}?", f"The day after {DAYS[d]} is {DAYS[(d + 1) % 7]}."
    if kind == 2:
        w, o = rng.choice(sorted(_OPPOSITES.items()))
        return f"What is the opposite of {w}?", f"The opposite of {w} is {o}."
    if kind == 3:
        n = rng.randint(1, 500)
        return f"Is {n} an even or an odd number?", f"{n} is an {'even' if n % 2 == 0 else 'odd'} number."
    if kind == 4:
        w = rng.choice(_NOUNS)
        return f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."
    a, b = rng.sample(range(1, 1000), 2)
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."


def _mix_prose(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        out.append(f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} stood beside the {rng.choice(_NOUNS)}, "
                   f"and in {rng.choice(MONTHS)} the {rng.choice(_NOUNS)} looked {rng.choice(_ADJ)}.")
    return " ".join(out)


def upgrade_texts(tok, n: int, seed: int) -> list[str]:
    """The 1.1 mix: half chat exchanges that answer in full sentences, half plain prose;
    each is a whole text trained on every token (continued pretraining, not a skill)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        if rng.random() < 0.5:
            q, a = _mix_chat(rng)
            texts.append(chat_prompt(tok, q) + a + tok.eos_token)
        else:
            texts.append(_mix_prose(rng))
    return texts
