"""Upload and download throughput of the hub, and the web process's peak memory.

Starts a real hub (gunicorn, SQLite, filesystem blobs) on a fresh HUB_HOME,
registers a synthetic base, then pushes and pulls a LoRA adapter of SIZE MB
(default 500) through the REST API with a streaming client. The anchor is a
plain local file copy of the same bytes (the disk's own speed), measured in the
same run. Run it at two sizes: the web process's peak RSS must not grow with
the file size (uploads are spooled and hashed in chunks, downloads streamed).

    python benchmarks/bench_registry_io.py --size-mb 500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], str]], fill_seed: int) -> None:
    """Write F32 tensors of the given shapes without holding them all in memory."""
    header, offset = {}, 0
    for name, (shape, _) in tensors.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(fill_seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape, _ in tensors.values():
            f.write(rng.standard_normal(int(np.prod(shape)), dtype=np.float32).tobytes())


def build_inputs(work: Path, size_mb: int, hidden: int = 2048):
    """A base with `layers` q/v projections of hidden x hidden, and a LoRA whose
    rank makes the adapter about size_mb (a large rank is still a valid LoRA)."""
    per_layer = 2 * 2 * hidden * hidden * 4  # two modules, A and B at rank = hidden
    layers = max(1, round(size_mb * 1024**2 / per_layer))
    base, adapter = work / "base", work / "adapter"
    base.mkdir()
    adapter.mkdir()
    base_t, lora_t = {}, {}
    for i in range(layers):
        for m in ("q_proj", "v_proj"):
            base_t[f"model.layers.{i}.self_attn.{m}.weight"] = ([hidden, hidden], "F32")
            prefix = f"base_model.model.model.layers.{i}.self_attn.{m}"
            lora_t[f"{prefix}.lora_A.weight"] = ([hidden, hidden], "F32")
            lora_t[f"{prefix}.lora_B.weight"] = ([hidden, hidden], "F32")
    write_safetensors(base / "model.safetensors", base_t, 0)
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": hidden}))
    write_safetensors(adapter / "adapter_model.safetensors", lora_t, 1)
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": hidden, "lora_alpha": hidden, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "bench-base", "task_type": "CAUSAL_LM",
    }))
    return base, adapter


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (gunicorn's workers)."""
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]
    peak = 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except FileNotFoundError:
            pass
    return peak


def start_hub(home: Path, port: int):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "S3_BUCKET")}
    env.update(HUB_HOME=str(home), DJANGO_SETTINGS_MODULE="hub.settings", PYTHONPATH=str(ROOT))
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "manage.py"), *a], env=env, check=True,  # noqa: E731
                                    capture_output=True, text=True)
    run("migrate", "-v0")
    token = run("hubtoken", "bench", "--create-user", "--staff").stdout.strip().splitlines()[-1]
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "hub.wsgi:application", "-b", f"127.0.0.1:{port}", "-k", "gthread",
         "--threads", "4", "--workers", "1", "--timeout", "600"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/api/v1/base-models/", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    return proc, url, token


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def run_once(size_mb: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-io-"))
    try:
        base, adapter = build_inputs(work, size_mb)
        weights = adapter / "adapter_model.safetensors"
        nbytes = weights.stat().st_size
        t = time.perf_counter()
        shutil.copyfile(weights, work / "copy.safetensors")
        copy_s = time.perf_counter() - t
        os.remove(work / "copy.safetensors")

        proc, url, token = start_hub(work / "home", free_port())
        try:
            hdr = {"Authorization": f"Bearer {token}"}
            with open(base / "model.safetensors", "rb") as w, open(base / "config.json", "rb") as c:
                r = httpx.post(url + "/api/v1/base-models/", headers=hdr, timeout=600,
                               data={"slug": "bench-base"},
                               files=[("files", ("model.safetensors", w)), ("files", ("config.json", c))])
            r.raise_for_status()
            rss_idle = peak_rss_mb(proc.pid)
            t = time.perf_counter()
            with open(weights, "rb") as w, open(adapter / "adapter_config.json", "rb") as c:
                r = httpx.post(url + "/api/v1/adapters/", headers=hdr, timeout=600,
                               data={"name": "bench/big", "base_model": "bench-base"},
                               files=[("files", ("adapter_model.safetensors", w)),
                                      ("files", ("adapter_config.json", c))])
            up_s = time.perf_counter() - t
            r.raise_for_status()
            t = time.perf_counter()
            h = hashlib.sha256()
            with httpx.stream("GET", url + "/api/v1/adapters/bench/big/files/adapter_model.safetensors",
                              headers=hdr, timeout=600) as resp:
                resp.raise_for_status()
                for chunk in resp.iter_bytes(1 << 20):
                    h.update(chunk)
            down_s = time.perf_counter() - t
            assert h.hexdigest() == sha256_file(weights), "download differs from upload"
            rss_peak = peak_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
        mb = nbytes / 1024**2
        return {"size_mb": mb, "upload_mb_s": mb / up_s, "download_mb_s": mb / down_s, "copy_mb_s": mb / copy_s,
                "web_rss_idle_mb": rss_idle, "web_rss_peak_mb": rss_peak}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, nargs="+", default=[50, 500])
    args = ap.parse_args()
    rows = [run_once(s) for s in args.size_mb]
    print(f"{'adapter MB':>10} {'upload MB/s':>12} {'download MB/s':>14} {'disk copy MB/s':>15} "
          f"{'up/copy':>8} {'down/copy':>10} {'web RSS peak MB':>16}")
    for r in rows:
        print(f"{r['size_mb']:10.0f} {r['upload_mb_s']:12.1f} {r['download_mb_s']:14.1f} {r['copy_mb_s']:15.1f} "
              f"{r['upload_mb_s'] / r['copy_mb_s']:8.2f} {r['download_mb_s'] / r['copy_mb_s']:10.2f} "
              f"{r['web_rss_peak_mb']:16.0f}")
    if len(rows) > 1:
        growth = rows[-1]["web_rss_peak_mb"] - rows[0]["web_rss_peak_mb"]
        print(f"web RSS growth from {rows[0]['size_mb']:.0f} MB to {rows[-1]['size_mb']:.0f} MB: {growth:+.0f} MB "
              f"({'flat: streamed' if growth < 0.1 * rows[-1]['size_mb'] else 'GROWS with file size'})")


if __name__ == "__main__":
    main()
