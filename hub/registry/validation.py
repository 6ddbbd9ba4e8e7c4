"""Upload validation for the registry, from JSON headers only.

The web process never imports torch (ARCHITECTURE.md, boundary 3): a
safetensors file is checked by reading its 8-byte length and JSON header and
applying the format's own rules (size cap, known dtypes, dtype x shape = bytes,
contiguous offsets, exact file length); a PEFT adapter is checked by comparing
the shapes in its header with the base model's manifest. Standard library only.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import PurePosixPath
from typing import BinaryIO
from urllib.parse import quote

# Standard library only (no torch): the QA-LoRA declaration rule the library applies too.
from adapters_ops import peft_patterns, qalora_declaration, safetensors_header
from hub.errors import HubError

# Header caps, checked before the JSON is parsed (safetensors' own 100 MB would let one
# upload hold the web process for a minute and grow it by 1.7 GB). An adapter: a 70B
# all-linear LoRA has ~1,100 tensors, a LoRA on every expert of a 128-expert MoE ~37,000
# (~6 MB of header). Base weights (staff only): one shard, or a whole MoE in one file.
MAX_HEADER_BYTES = 8 << 20
MAX_HEADER_TENSORS = 50_000
BASE_MAX_HEADER_BYTES = 32 << 20
BASE_MAX_HEADER_TENSORS = 200_000
MAX_NAME_CHARS = 255
MAX_PATH_CHARS = 1024
MAX_PATTERN_CHARS = peft_patterns.MAX_PATTERN_CHARS
# (rank_pattern key, module) pairs one upload may make the hub try: about a second. One key per
# module of a 405B all-linear LoRA makes 780,000.
MAX_PATTERN_CHECKS = 1_000_000
MAX_PATTERN_KEYS = 10_000
# adapter_config.json: 10,000 pattern keys of 256 characters fit; parsing stays cheap.
MAX_CONFIG_BYTES = 4 << 20
PEFT_PREFIX = "base_model.model."
WEIGHTS_FIELD = "adapter_model.safetensors"

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
ALLOWED_DOTFILES = {".gitattributes"}
# Control, format (bidi, zero-width), surrogate, private-use and unassigned code points,
# and the line and paragraph separators.
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


class ValidationError(HubError):
    """An upload or request the hub refuses (400; 413 for a too-large upload):
    `code` for machines, `detail` for people, `field` for the form field or file concerned."""

    def __init__(self, code: str, detail: str, field: str | None = None):
        super().__init__(detail, code=code, field=field, status=413 if code == "upload_too_large" else 400)

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


# --- safetensors -------------------------------------------------------------------


def read_safetensors_header(
    fileobj: BinaryIO, size: int | None = None, *, max_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = MAX_HEADER_TENSORS,
) -> dict:
    """Read and validate a safetensors header without reading any tensor data
    (adapters_ops.safetensors_header, which the library's checkpoint reader shares).

    Returns the header: {name: {"dtype", "shape", "data_offsets"}}, plus
    "__metadata__" (str -> str) when the file has one. The caps default to an
    adapter's; base weights pass BASE_MAX_HEADER_BYTES / BASE_MAX_HEADER_TENSORS.
    """
    try:
        return safetensors_header.read_header(fileobj, size, max_bytes=max_bytes, max_tensors=max_tensors)
    except safetensors_header.HeaderError as exc:
        raise ValidationError(exc.code, exc.detail) from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def manifest_from_header(header: dict) -> dict:
    """name -> {"shape", "dtype"}: what a base model's manifest stores."""
    return {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in header.items() if k != "__metadata__"}


# --- file names ----------------------------------------------------------------------


def check_filename(path: str) -> str:
    """Normalise an uploaded relative path (NFC); refuse anything that could escape
    the revision's tree, hides characters or is a pickle."""
    def bad(why):
        return ValidationError("bad_filename", f"{path!r} is not an acceptable file name: {why}.", field="files")

    if not isinstance(path, str) or not path:
        raise bad("it is empty")
    path = unicodedata.normalize("NFC", path)
    # Bidi overrides and zero-width characters make a name read as another one
    # (evil\u202egnp.safetensors shows as evilsafetensors.png); control characters
    # break logs and headers.
    hidden = next((c for c in path if unicodedata.category(c) in _INVISIBLE_CATEGORIES), None)
    if hidden is not None:
        raise bad(f"it contains the invisible or control character U+{ord(hidden):04X}")
    # Fullwidth dots and slashes, ligatures and the like read as (and turn into) ASCII ones.
    if unicodedata.normalize("NFKC", path) != path:
        raise bad("it contains compatibility characters (fullwidth, ligatures, ...) that stand for other ones; "
                  "use their plain form")
    if "\\" in path:
        raise bad("it contains a backslash")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise bad("it is absolute")
    if len(path) > MAX_PATH_CHARS:
        raise bad(f"it is longer than {MAX_PATH_CHARS} characters")
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part == "":
            raise bad("it has an empty segment")
        if part in (".", ".."):
            raise bad("it contains '.' or '..'")
        if part.startswith(".") and not (i == len(parts) - 1 and part in ALLOWED_DOTFILES):
            raise bad("hidden files are not accepted")
        if len(part) > MAX_NAME_CHARS:
            raise bad(f"a segment is longer than {MAX_NAME_CHARS} characters")
    if PurePosixPath(path).suffix.lower() in PICKLE_SUFFIXES:
        raise ValidationError(
            "pickle_refused",
            f"{path} is a pickle file; pickle files can run code when they are loaded, "
            "so the hub only accepts safetensors weights.",
            field="files",
        )
    return path


def content_disposition(path: str, disposition: str = "attachment") -> str:
    """A Content-Disposition value for a stored file (RFC 6266): the exact name,
    percent-encoded, in filename*, and an ASCII fallback without quotes,
    backslashes or percent signs for clients that only read filename."""
    name = path.rsplit("/", 1)[-1]
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


# --- PEFT config -----------------------------------------------------------------------

# A quantified group that itself holds a quantifier, e.g. (a+)+: such user
# regexes can backtrack for minutes, and the web process must not.
_NESTED_QUANTIFIER = re.compile(r"\([^()]*[*+}][^()]*\)\s*[*+{]")


def ascii_digits(text: str) -> bool:
    """Whether `text` is a non-negative integer written in ASCII digits, the only form the
    hub reads as a number from a path, a query or a header: str.isdigit() passes "¹" (which
    int() refuses), and int() reads "٣", " 3" and "3_0"."""
    return text.isascii() and text.isdecimal()


def _config_error(detail: str, code: str = "invalid_config") -> ValidationError:
    return ValidationError(code, detail, field="adapter_config.json")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_pattern(pattern, what: str) -> None:
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise _config_error(f"{what} must be a non-empty string of at most {MAX_PATTERN_CHARS} characters.")
    if _NESTED_QUANTIFIER.search(pattern):
        raise _config_error(f"{what} {pattern!r} nests quantifiers; simplify the pattern.")
    _check_compiles(pattern, what)


def _check_compiles(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)  # compiling matches nothing: safe on any pattern
    except re.error as exc:
        raise _config_error(f"{what} {pattern!r} is not a valid regex: {exc}.") from None


def validate_peft_config(data: bytes) -> dict:
    """Parse adapter_config.json and check the fields the hub relies on."""
    bad = _config_error
    if len(data) > MAX_CONFIG_BYTES:
        raise bad(f"adapter_config.json has {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}.", "config_too_large")
    try:
        config = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"adapter_config.json is not valid JSON: {exc}.") from None
    if not isinstance(config, dict):
        raise bad("adapter_config.json must be a JSON object.")
    if config.get("peft_type") != "LORA":
        raise bad(f"peft_type is {config.get('peft_type')!r}; the hub holds LoRA adapters (\"LORA\").", "not_lora")
    # Missing r / lora_alpha mean PEFT's defaults; present ones must be well typed.
    if "r" in config and not (_is_int(config["r"]) and config["r"] > 0):
        raise bad(f"r must be a positive integer, got {config['r']!r}.")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise bad(f"lora_alpha must be a number, got {config['lora_alpha']!r}.")
    tm = config.get("target_modules")
    if isinstance(tm, str):
        _check_pattern(tm, "target_modules")
    elif not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
        raise bad("target_modules must be a non-empty list of module names or a regex string.")
    checks = (("rank_pattern", lambda v: _is_int(v) and v > 0, "positive integers"),
              ("alpha_pattern", _is_number, "numbers"))
    for name, ok, kind in checks:
        pattern = config.get(name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(f"{name} must be an object mapping module patterns to {kind}.")
        if len(pattern) > MAX_PATTERN_KEYS:
            raise bad(f"{name} has {len(pattern)} keys; the limit is {MAX_PATTERN_KEYS}.", "unsupported_pattern")
        for key, value in pattern.items():
            if not isinstance(key, str) or not key or len(key) > MAX_PATTERN_CHARS:
                raise bad(f"{name} keys must be non-empty strings of at most {MAX_PATTERN_CHARS} characters.")
            if peft_patterns.parse_pattern_key(key) is None:
                _check_compiles(key, f"{name} key")
                raise bad(f"{name} key {key!r} is not a form the hub accepts: PEFT runs it as a regex, and "
                          f"regexes can take minutes to match. Accepted: {peft_patterns.PATTERN_KEY_FORMS}.",
                          "unsupported_pattern")
            if not ok(value):
                raise bad(f"{name}[{key!r}] must be one of {kind}, got {value!r}.")
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora", "use_qalora"):
        if flag in config and config[flag] is not None and not isinstance(config[flag], bool):
            raise bad(f"{flag} must be true or false, got {config[flag]!r}.")
    if config.get("qalora_pooling") not in (None, "mean"):
        raise bad(f"qalora_pooling must be \"mean\" or absent, got {config['qalora_pooling']!r}.")
    qalora_group(config)  # a declared QA-LoRA needs a positive group size
    return config


def qalora_group(config: dict) -> int | None:
    """The QA-LoRA group size G the config declares, None for a plain LoRA (the rule and its
    wording: adapters_ops.qalora_declaration, shared with the library)."""
    try:
        return qalora_declaration.declared_group(config)
    except qalora_declaration.DeclarationError as exc:
        raise _config_error(exc.detail + ".", exc.code) from None


# --- LoRA shapes against the base -------------------------------------------------------

# q_proj.lora_A.weight, q_proj.lora_A.default.weight; embeddings have no ".weight".
_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<f>[AB])(?:\.(?!weight$)[^.]+)?\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<f>[AB])(?:\.[^.]+)?$")
# Wrappers PEFT puts around a base tensor's name in saved extra weights.
_WRAPPER = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")


@dataclass
class AdapterSummary:
    r: int
    lora_alpha: float
    target_modules: list[str] = field(default_factory=list)
    dtype: str = ""
    n_params: int = 0
    modules: int = 0


def pattern_value(pattern: dict | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (adapters_ops.peft_patterns); a key of a form
    the hub does not accept is a 400."""
    try:
        return peft_patterns.pattern_value(pattern, module, default)
    except peft_patterns.UnsupportedKey as exc:
        raise _config_error(str(exc), "unsupported_pattern") from None


# A string target_modules is a regex PEFT full-matches (Python's `re`) against every module name of
# the base when the adapter is loaded. The hub runs it the same way, on the same names, in a child
# process it kills after this budget: `re` holds the GIL and cannot be interrupted in the web process,
# and a pattern that cannot match the names quickly would stall every user's load.
TARGET_REGEX_BUDGET_S = 1.0
_MATCH_ALL = ("import json, re, sys; p, names = json.load(sys.stdin); c = re.compile(p); "
              "[c.fullmatch(n) for n in names]")


def check_target_modules_regex(pattern: str, base_manifest: dict) -> None:
    """Refuse a target_modules regex that takes too long on the base's module names (ReDoS)."""
    import subprocess
    import sys

    names = sorted({name.rsplit(".", 1)[0] for name in base_manifest})
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _MATCH_ALL], input=json.dumps([pattern, names]),
                              capture_output=True, text=True, timeout=TARGET_REGEX_BUDGET_S)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise _config_error(f"target_modules {pattern!r} takes more than {TARGET_REGEX_BUDGET_S:g} s to match the "
                            f"base's {len(names)} module names; PEFT would run it on every load. List the modules, "
                            "or simplify the pattern.", "unsupported_pattern") from None
    if done.returncode != 0:
        raise _config_error(f"target_modules {pattern!r} is not a valid regex.")


def check_lora_shapes(header: dict, config: dict, base_manifest: dict) -> AdapterSummary:
    """Check every LoRA pair in an adapter header against the base's manifest."""
    if isinstance(config.get("target_modules"), str):
        check_target_modules_regex(config["target_modules"], base_manifest)
    pairs: dict[str, dict[str, tuple[str, list]]] = {}  # module -> {"A"|"B": (key, shape)}
    embeds: set[str] = set()
    numel_by_dtype: Counter = Counter()
    n_params = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        numel = math.prod(info["shape"])
        n_params += numel
        m = _LINEAR_KEY.match(key) or _EMBED_KEY.match(key)
        if m is None:
            _check_extra_tensor(key, info["shape"], base_manifest)
            continue
        module = m["module"].removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[m["f"]] = (key, info["shape"])
        if m.re is _EMBED_KEY:
            embeds.add(module)
        numel_by_dtype[info["dtype"]] += numel
    if not pairs:
        raise ValidationError("not_lora", "The weights hold no lora_A / lora_B tensor.", field=WEIGHTS_FIELD)
    keys = len(config.get("rank_pattern") or {})
    if keys * len(pairs) > MAX_PATTERN_CHECKS:  # each module is tried against every key, as PEFT does
        raise _config_error(
            f"rank_pattern has {keys} keys for {len(pairs)} LoRA modules; the hub checks at most "
            f"{MAX_PATTERN_CHECKS} (key, module) pairs. Name the modules whose rank differs from r.",
            "unsupported_pattern")

    r = config.get("r", 8)
    rank_of = cache(lambda module: pattern_value(config.get("rank_pattern"), module, r))  # asked twice a module
    swap = bool(config.get("fan_in_fan_out"))  # GPT-2 style Conv1D stores [in, out]
    group = _check_qalora_reading(pairs, embeds, config, base_manifest, swap, rank_of)
    for module, found in sorted(pairs.items()):
        for have, miss in (("A", "B"), ("B", "A")):
            if have in found and miss not in found:
                raise ValidationError(
                    "missing_tensor", f"{module} has lora_{have} but no lora_{miss}.", field=WEIGHTS_FIELD
                )
        base = base_manifest.get(module + ".weight")
        if base is None:
            raise ValidationError(
                "unknown_module",
                f"{module}: the base model has no weight {module}.weight; the adapter was probably trained for another base.",
                field=WEIGHTS_FIELD,
            )
        rank = rank_of(module)
        want = _expected_shapes(base["shape"], rank, embedding=module in embeds, swap=swap and module not in embeds,
                                group=group)
        for f in ("A", "B"):
            shape = found[f][1]
            if want is None or list(shape) != want[f]:
                need = f"needs {want[f]}" if want else "cannot carry a LoRA pair"
                raise ValidationError(
                    "shape_mismatch",
                    f"{module}: lora_{f} has shape {list(shape)} but the base weight {list(base['shape'])} {need}.",
                    field=WEIGHTS_FIELD,
                )
    short = sorted({m.rsplit(".", 1)[-1] for m in pairs})
    return AdapterSummary(
        r=r, lora_alpha=config.get("lora_alpha", 8), target_modules=short,
        dtype=numel_by_dtype.most_common(1)[0][0] if numel_by_dtype else "",
        n_params=n_params, modules=len(pairs),
    )


def _check_qalora_reading(pairs: dict, embeds: set, config: dict, base_manifest: dict, swap: bool,
                          rank_of: Callable[[str], int]) -> int | None:
    """Which LoRA the linear pairs' shapes show, against what the config declares; returns the
    declared QA-LoRA group size (None: a plain LoRA).

    A LoRA's lora_A has in_features columns, a QA-LoRA's in_features / G. When every linear pair
    whose rank and lora_B fit the base reads as one G > 1 (or as a LoRA), that reading must be the
    declared one: otherwise `qalora_undeclared` / `qalora_declaration_mismatch`, naming both
    shapes. Pairs that fit no reading are left to the per-module checks (`shape_mismatch`)."""
    declared = qalora_group(config)
    rows = []  # (module, in_features, columns of lora_A)
    for module, found in sorted(pairs.items()):
        base = base_manifest.get(module + ".weight")
        if module in embeds or "A" not in found or "B" not in found or base is None or len(base["shape"]) != 2:
            continue
        out_f, in_f = reversed(base["shape"]) if swap else base["shape"]
        rank = rank_of(module)
        a, b = found["A"][1], found["B"][1]
        if len(a) == 2 and a[0] == rank and list(b) == [out_f, rank]:
            rows.append((module, in_f, a[1]))
    try:
        qalora_declaration.check_reading(rows, declared)
    except qalora_declaration.DeclarationError as exc:
        raise ValidationError(exc.code, exc.detail + ".", field=WEIGHTS_FIELD) from None
    return declared


def _expected_shapes(base_shape: list, r: int, *, embedding: bool, swap: bool, group: int | None = None) -> dict | None:
    """The shapes of A and B for a base weight, or None if it takes no LoRA (`group`: a declared
    QA-LoRA's G, whose linear lora_A has in_features / G columns)."""
    if embedding:  # weight [num_embeddings, dim]; A: r x num_embeddings, B: dim x r
        if len(base_shape) != 2:
            return None
        return {"A": [r, base_shape[0]], "B": [base_shape[1], r]}
    if len(base_shape) == 2:
        out_f, in_f = reversed(base_shape) if swap else base_shape
        if group:
            return {"A": [r, in_f // group], "B": [out_f, r]} if in_f % group == 0 else None
        return {"A": [r, in_f], "B": [out_f, r]}
    if len(base_shape) > 2:  # convolution [out, in, *kernel]: A carries the kernel, B is 1x1
        out_f, in_f, *kernel = base_shape
        return {"A": [r, in_f, *kernel], "B": [out_f, r] + [1] * len(kernel)}
    return None


def _check_extra_tensor(key: str, shape: list, base_manifest: dict) -> None:
    """A non-LoRA tensor (modules_to_save, a saved embedding) must fit the base
    tensor it names; tensors that name none are left alone."""
    name = _WRAPPER.sub("", key.removeprefix(PEFT_PREFIX))
    base = base_manifest.get(name)
    if base is not None and list(base["shape"]) != list(shape):
        raise ValidationError(
            "shape_mismatch", f"{key} has shape {list(shape)} but the base tensor {name} has {list(base['shape'])}.",
            field=WEIGHTS_FIELD,
        )


# --- seed examples -----------------------------------------------------------------------


def validate_seeds(data: bytes, max_lines: int = 10000) -> int:
    """Check the seed-examples JSONL: one {"prompt": str, "completion": str} per line."""
    def bad(detail):
        return ValidationError("invalid_seeds", detail, field="seeds")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"The seeds file is not UTF-8: {exc}.") from None
    count = 0
    # Split on "\n" only: str.splitlines() would also split inside JSON strings
    # that hold U+2028 or other Unicode line separators.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) carry nothing
        count += 1
        if count > max_lines:
            raise bad(f"The seeds file has more than {max_lines} examples.")
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise bad(f"Line {lineno} is not valid JSON: {exc}.") from None
        if not isinstance(row, dict):
            raise bad(f"Line {lineno} must be a JSON object.")
        for k in ("prompt", "completion"):
            if not isinstance(row.get(k), str):
                raise bad(f"Line {lineno} needs a string \"{k}\".")
    if count == 0:
        raise bad("The seeds file holds no example.")
    return count
