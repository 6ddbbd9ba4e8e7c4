"""The hub's data path against the disk: upload, download, Range and
`hf_hub_download` of one large base-model file, each beside a local file copy
of the same bytes measured in the same run.

Starts a real hub the way `hubctl serve` runs its web process (gunicorn,
gthread, `hub.cli.serve:embedded_app()`), on SQLite and a fresh HUB_HOME,
with filesystem blobs or, with `--storage s3`, a SeaweedFS (`weed mini`) it
starts itself. The HTTP client is curl, so the numbers are the server's, not
a Python client's; `hf_hub_download` uses huggingface_hub unmodified with
HF_ENDPOINT pointing at the hub. For each step it records the web process's
CPU seconds per GB (gunicorn master and workers, from /proc) and how far its
resident memory rose above where it stood before the step (peak RSS, reset
per step through /proc/PID/clear_refs).

The anchors are coreutils `cp` (copy_file_range: the kernel copies page cache
to page cache) and a copy through user space in 8 MiB reads and writes (what
any client that writes a download to disk must at least do). On this VM a
write() of new file data runs at about 430 MB/s once the machine has been
idle for a second and at about 4.7 GB/s right after another write (measured
with dd and a Python loop of 4 MiB writes; cp's copy_file_range stays near
3 GB/s either way). So every step and both anchors start the same way:
`sync`, then `--settle` seconds idle (default 2), and all run `--repeat`
times, interleaved round by round; the table shows medians and the ratios
of medians. "download to /dev/null" is the same curl download
with nothing written: the hub's own speed, without the client's disk.

    python benchmarks/bench_registry_io.py --size-mb 512 4096 --storage fs s3
    python benchmarks/bench_registry_io.py --root /tmp/old-tree   # another checkout: a 'before' figure
    python benchmarks/bench_registry_io.py --front nginx --size-mb 512

With `--front nginx` (filesystem blobs) an nginx configured as docs/deploy.md
shows stands in front of the hub, which runs with UPLOAD_ACCEL=nginx and
BLOB_ACCEL=x-accel-redirect: the staged upload (`PUT /api/v1/uploads/{sha256}`,
curl) goes through nginx, which stores the body and names its file, and the
download comes back through X-Accel-Redirect; the same PUT straight to
gunicorn (the body read by the hub) is timed beside it, with the same copy
anchors, and nginx's own CPU seconds per GB are shown too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # hub.nginx: the server block of docs/deploy.md
BIN = Path(sys.executable).parent
TENSOR = 4096 * 4096  # F32 elements per tensor: 64 MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_base(folder: Path, size_mb: int) -> Path:
    """config.json + model.safetensors of about size_mb (64 MiB F32 tensors).
    The tensor bytes repeat one random block: content does not change I/O cost."""
    folder.mkdir(parents=True)
    n = max(1, round(size_mb / 64))
    header, step = {}, TENSOR * 4
    for i in range(n):
        header[f"model.layers.{i}.mlp.up_proj.weight"] = {
            "dtype": "F32", "shape": [4096, 4096], "data_offsets": [i * step, (i + 1) * step]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = np.random.default_rng(0).standard_normal(TENSOR, dtype=np.float32).tobytes()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _ in range(n):
            f.write(block)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096}))
    return folder / "model.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the web process, seen from /proc ---------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [int(p) for p in out]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


class Meter:
    """CPU seconds and the largest rise of any web process's RSS during one step."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        self.pids = tree_pids(self.pid)
        self.rss0 = {}
        for p in self.pids:
            Path(f"/proc/{p}/clear_refs").write_text("5")  # restart VmHWM from the current RSS
            self.rss0[p] = _status(p, "VmRSS:")
        self.cpu0 = cpu_seconds(self.pid)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = cpu_seconds(self.pid) - self.cpu0
        self.rss_growth = max(_status(p, "VmHWM:") - self.rss0[p] for p in self.pids)
        self.rss_peak = max(_status(p, "VmHWM:") for p in self.pids)


# --- servers ----------------------------------------------------------------------------------


# Ports of our own for every SeaweedFS service (and each gRPC port, which
# defaults to port + 10000): tests elsewhere may run a `weed mini` on the defaults.
WEED_PORTS = {"master.port": 41333, "master.port.grpc": 41334, "volume.port": 41080, "volume.port.grpc": 41081,
              "filer.port": 41888, "filer.port.grpc": 41889, "s3.port": 41833, "s3.port.grpc": 41834,
              "admin.port": 41646, "admin.port.grpc": 41647, "webdav.port": 41733, "debug.port": 41060,
              "s3.port.iceberg": 41181, "s3.port.lance": 41182}
S3_ENDPOINT = f"http://127.0.0.1:{WEED_PORTS['s3.port']}"


def start_weed(data: Path) -> subprocess.Popen:
    import boto3

    weed = shutil.which("weed") or str(BIN / "weed")
    flags = [f"-{k}={v}" for k, v in WEED_PORTS.items()]
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-bucket=bench", *flags],
                            stdout=open(data / "weed.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)
    s3 = boto3.client("s3", endpoint_url=S3_ENDPOINT, aws_access_key_id="hub",
                      aws_secret_access_key="hub", region_name="us-east-1")
    for _ in range(180):
        try:
            s3.put_object(Bucket="bench", Key="ready", Body=b"ok")
            return proc
        except Exception:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"SeaweedFS did not start (are ports {sorted(WEED_PORTS.values())} free?)")


def s3_put(path: Path, key: str) -> None:
    """One file into the benchmark's bucket the way the hub stores a blob: boto3's
    managed transfer with the hub's part size, parts in flight and checksum."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    part, in_flight = 16 * 1024 * 1024, 4  # hub/storage.py's S3_PART and S3_PARTS_IN_FLIGHT (it needs Django)
    s3 = boto3.client("s3", endpoint_url=S3_ENDPOINT, aws_access_key_id="hub", aws_secret_access_key="hub",
                      region_name="us-east-1")
    s3.upload_file(str(path), "bench", key, ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                   Config=TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                         max_concurrency=in_flight))


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def hub_env(root: Path, home: Path, storage: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "S3_BUCKET", "HF_ENDPOINT")}
    env.update(HUB_HOME=str(home), DJANGO_SETTINGS_MODULE="hub.settings", PYTHONPATH=str(root),
               MAX_UPLOAD_BYTES=str(64 * 1024**3))
    if storage == "s3":
        env.update(S3_BUCKET="bench", AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ACCESS_KEY_ID="hub",
                   AWS_SECRET_ACCESS_KEY="hub", S3_DOWNLOAD_MODE="proxy")
    return env


def start_hub(root: Path, env: dict, port: int):
    def manage(*a):
        return subprocess.run([sys.executable, str(root / "manage.py"), *a], env=env, check=True,
                              capture_output=True, text=True, cwd=root)
    manage("migrate", "-v0")
    token = manage("hubtoken", "bench", "--create-user", "--staff").stdout.strip().splitlines()[-1]
    flags = ["--no-control-socket"] if int(__import__("gunicorn").__version__.split(".")[0]) >= 27 else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "hub.cli.serve:embedded_app()", "-b", f"127.0.0.1:{port}",
         "--worker-class", "gthread", "--workers", "1", "--threads", "8", "--timeout", "900", *flags],
        env=env, cwd=root, stdout=open(Path(env["HUB_HOME"]) / "gunicorn.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if subprocess.run(["curl", "-sf", "-o", "/dev/null", url + "/api/v1/base-models/"]).returncode == 0:
            return proc, url, token
        time.sleep(0.2)
    stop(proc)
    raise SystemExit("the hub did not start")


def start_nginx(work: Path, upstream: str, blobs: Path, body_buffer: str) -> tuple[subprocess.Popen, str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    home = work / "nginx"
    home.mkdir()
    blobs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    from hub.nginx import standalone_conf  # docs/deploy.md's server block, this run's paths

    (home / "nginx.conf").write_text(standalone_conf(home=str(home), listen=f"127.0.0.1:{port}",
                                                     upstream=upstream.removeprefix("http://"), blob_root=str(blobs),
                                                     body_buffer=body_buffer, as_root=os.geteuid() == 0))
    proc = subprocess.Popen([nginx, "-p", str(home), "-c", str(home / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        if subprocess.run(["curl", "-sf", "-o", "/dev/null", url + "/api/v1/base-models/"]).returncode == 0:
            return proc, url
        time.sleep(0.1)
    stop(proc)
    raise SystemExit(f"nginx did not start: {(home / 'error.log').read_text()[-2000:]}")


SETTLE = 2.0  # seconds idle before each timed step (--settle)


def settle() -> None:
    """No dirty pages of the step before, and the same idle start for every step."""
    os.sync()
    time.sleep(SETTLE)


def copy_anchors(src: Path, scratch: Path) -> dict[str, float]:
    """Seconds of the two local copies of src, each after settle()."""
    seconds = {}
    settle()
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(scratch)], check=True)
    seconds["cp"] = time.perf_counter() - t
    os.remove(scratch)
    settle()
    t = time.perf_counter()
    with open(src, "rb") as f, open(scratch, "wb") as dst:
        while chunk := f.read(8 << 20):
            dst.write(chunk)
    seconds["rw"] = time.perf_counter() - t
    os.remove(scratch)
    return seconds


def median(values: list[float]) -> float:
    return float(np.median(values))


def summarize(samples: dict[str, list[dict]], anchors: list[dict[str, float]], mb: float) -> tuple[dict, float, float]:
    """Per step: median MB/s, CPU s/GB and seconds, the largest RSS rise, and each
    sample's MB/s; plus the median MB/s of the two anchors."""
    copy_mb_s = median([mb / a["cp"] for a in anchors])
    rw_copy_mb_s = median([mb / a["rw"] for a in anchors])
    rows = {}
    for name, runs in samples.items():
        rows[name] = {"mb_s": median([r["mb_s"] for r in runs]), "samples_mb_s": [round(r["mb_s"]) for r in runs],
                      "seconds": median([r["seconds"] for r in runs]),
                      "cpu_s_per_gb": median([r["cpu_s_per_gb"] for r in runs]),
                      "rss_growth_mb": max(r["rss_growth_mb"] for r in runs),
                      "rss_peak_mb": max(r["rss_peak_mb"] for r in runs)}
        if "front_cpu_s_per_gb" in runs[0]:
            rows[name]["front_cpu_s_per_gb"] = median([r["front_cpu_s_per_gb"] for r in runs])
    return rows, copy_mb_s, rw_copy_mb_s


def curl(*args: str) -> None:
    subprocess.run(["curl", "-sS", "--fail-with-body", *args], check=True, stdout=subprocess.DEVNULL)


HF_SCRIPT = """
import sys, time
from huggingface_hub import hf_hub_download
t = time.perf_counter()
path = hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], token=sys.argv[4])
print(time.perf_counter() - t, path)
"""


def flip_last_byte(src: Path, dst: Path, salt: int) -> None:
    """dst: src with its last byte changed (salt picks how), a valid safetensors
    file of other bytes, so the hub has not seen them and a HEAD skips nothing."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ (salt + 1)]))


def hf_download(repo: str, cache: Path, token: str, env: dict, result: dict) -> None:
    """hf_hub_download in a fresh interpreter; result gets its own timing and the file's path."""
    r = subprocess.run([sys.executable, "-c", HF_SCRIPT, repo, "model.safetensors", str(cache), token], env=env,
                       check=True, capture_output=True, text=True)
    seconds, path = r.stdout.split()[-2:]
    result.update(seconds=float(seconds), path=path)


def run_once(root: Path, size_mb: int, storage: str, repeat: int = 3, only_downloads: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-io-"))
    weed = hub = None
    samples: dict[str, list[dict]] = {}
    anchors: list[dict[str, float]] = []
    try:
        weights = write_base(work / "base", size_mb)
        nbytes = weights.stat().st_size
        mb = nbytes / 1e6
        digest = sha256_file(weights)
        if storage == "s3":
            weed = start_weed(work / "weed")
        env = hub_env(root, work / "home", storage)
        hub, url, token = start_hub(root, env, free_port())
        auth = f"Authorization: Bearer {token}"
        out = work / "out.safetensors"

        def step(name, fn, nb=nbytes):
            settle()
            with Meter(hub.pid) as m:
                fn()
            samples.setdefault(name, []).append(
                {"mb_s": nb / 1e6 / m.seconds, "seconds": m.seconds, "cpu_s_per_gb": m.cpu / (nb / 1e9),
                 "rss_growth_mb": m.rss_growth, "rss_peak_mb": m.rss_peak})

        hf_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        hf_env.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                      HF_HUB_DISABLE_PROGRESS_BARS="1")
        cli_env = {**os.environ, "HUB_URL": url, "HUB_TOKEN": token, "PYTHONPATH": str(root)}
        file_url = url + "/api/v1/base-models/bench-base-0/files/model.safetensors"
        lo, hi = nbytes // 4, 3 * nbytes // 4 - 1
        for rnd in range(repeat):
            anchors.append(copy_anchors(weights, work / "copy.safetensors"))
            if storage == "s3" and rnd == 0:  # what the S3 server takes from boto3 alone, as the hub sends a blob
                # Once per run: `weed mini` sizes its volumes from the free disk at start, and three
                # more copies of a 4.3 GB file ran it out of them (its 'No writable volumes').
                step("S3 put alone (boto3)", partial(s3_put, weights, "anchor"))
            # Bytes new to the hub in every round (the first uploads the file the downloads read):
            # the same bytes again would skip the store's write (S3: the whole multipart upload).
            up = weights
            if rnd:
                up = work / "up" / weights.name
                up.parent.mkdir(exist_ok=True)
                flip_last_byte(weights, up, 100 + rnd)
            step("upload", partial(curl, "-H", auth, "-F", f"slug=bench-base-{rnd}", "-F", f"files=@{up}",
                                   "-F", f"files=@{weights.parent / 'config.json'}", url + "/api/v1/base-models/"))
            if rnd:
                up.unlink()
            step("download", lambda: curl("-H", auth, "-o", str(out), file_url))
            assert out.stat().st_size == nbytes and sha256_file(out) == digest, "download differs from upload"
            out.unlink()
            step("download to /dev/null", lambda: curl("-H", auth, "-o", "/dev/null", file_url))
            if only_downloads:
                continue
            step("range (middle half)", lambda: curl("-H", auth, "-r", f"{lo}-{hi}", "-o", str(out), file_url),
                 nb=hi - lo + 1)
            assert out.stat().st_size == hi - lo + 1, "range has the wrong length"
            with open(weights, "rb") as f:
                f.seek(lo)
                assert hashlib.sha256(f.read(1 << 20)).digest() == hashlib.sha256(out.open("rb").read(1 << 20)).digest()
            out.unlink()

            # hubctl base add: the CLI's staged upload (hash, HEAD, PUT of the raw body, commit)
            # of bytes new to the hub (untimed copy), else the HEAD finds them and nothing is sent.
            cli_dir = work / "cli-base"
            cli_dir.mkdir(exist_ok=True)
            shutil.copyfile(weights.parent / "config.json", cli_dir / "config.json")
            flip_last_byte(weights, cli_dir / weights.name, rnd)
            step("hubctl base add", partial(
                subprocess.run,
                [sys.executable, "-c", "import sys; from hub.cli.main import main; sys.exit(main(sys.argv[1:]))",
                 "base", "add", f"bench-base-cli-{rnd}", "--weights", str(cli_dir)],
                env=cli_env, check=True, capture_output=True))
            shutil.rmtree(cli_dir)

            result = {}
            step("hf_hub_download", partial(hf_download, "bench-base-0", work / "hf-cache", token, hf_env, result))
            # the client's own timing, without its import
            samples["hf_hub_download"][-1]["mb_s"] = mb / result["seconds"]
            assert sha256_file(Path(result["path"])) == digest, "hf_hub_download differs"
            shutil.rmtree(work / "hf-cache")
        rows, copy_mb_s, rw_copy_mb_s = summarize(samples, anchors, mb)
        return {"size_mb": mb, "storage": storage, "copy_mb_s": copy_mb_s, "rw_copy_mb_s": rw_copy_mb_s,
                "anchors_mb_s": [{k: round(mb / v) for k, v in a.items()} for a in anchors],
                "steps": rows, "load": os.getloadavg()}
    except BaseException:
        for log in (work / "home" / "gunicorn.log", work / "weed" / "weed.log"):
            if log.exists():
                print(f"--- the tail of {log.name}:\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise
    finally:
        if hub is not None:
            stop(hub)
        if weed is not None:
            stop(weed)
        shutil.rmtree(work, ignore_errors=True)


def run_front(root: Path, size_mb: int, front: str, body_buffer: str = "1m", repeat: int = 3) -> dict:
    """The staged upload and the download through a front server (nginx) that
    carries the bytes: UPLOAD_ACCEL=nginx and BLOB_ACCEL=x-accel-redirect."""
    assert front == "nginx"
    work = Path(tempfile.mkdtemp(prefix="bench-io-front-"))
    hub = nginx = None
    samples: dict[str, list[dict]] = {}
    anchors: list[dict[str, float]] = []
    try:
        weights = write_base(work / "base", size_mb)
        config = weights.parent / "config.json"
        nbytes = weights.stat().st_size
        mb = nbytes / 1e6
        digest = sha256_file(weights)
        env = hub_env(root, work / "home", "fs")
        blobs = work / "home" / "blobs"
        env.update(UPLOAD_ACCEL="nginx", UPLOAD_ACCEL_ROOT=str(blobs / ".nginx-body"),
                   BLOB_ACCEL="x-accel-redirect", BLOB_ACCEL_PREFIX="/_blobs/")
        hub, hub_url, token = start_hub(root, env, free_port())
        nginx, url = start_nginx(work, hub_url, blobs, body_buffer)
        auth = f"Authorization: Bearer {token}"
        out = work / "out.safetensors"

        def step(name, fn, nb=nbytes):
            settle()
            front_cpu0 = cpu_seconds(nginx.pid)
            with Meter(hub.pid) as m:
                fn()
            front_cpu = cpu_seconds(nginx.pid) - front_cpu0
            samples.setdefault(name, []).append(
                {"mb_s": nb / 1e6 / m.seconds, "seconds": m.seconds, "cpu_s_per_gb": m.cpu / (nb / 1e9),
                 "front_cpu_s_per_gb": front_cpu / (nb / 1e9), "rss_growth_mb": m.rss_growth,
                 "rss_peak_mb": m.rss_peak})

        put = ("-H", auth, "-H", "Expect:", "-H", "Content-Type: application/octet-stream")
        config_sha = sha256_file(config)
        curl(*put, "-T", str(config), f"{url}/api/v1/uploads/{config_sha}")
        file_url = url + "/api/v1/base-models/bench-base/files/model.safetensors"
        lo, hi = nbytes // 4, 3 * nbytes // 4 - 1
        for rnd in range(repeat):
            anchors.append(copy_anchors(weights, work / "copy.safetensors"))
            # Bytes new to the hub for each PUT (a staged blob is answered 200 without a transfer
            # only by HEAD; PUT always reads the body, but the store would keep the first copy).
            via, direct = work / "via.safetensors", work / "direct.safetensors"
            flip_last_byte(weights, via, 2 * rnd)
            flip_last_byte(weights, direct, 2 * rnd + 1)
            via_sha, direct_sha = sha256_file(via), sha256_file(direct)
            step("PUT via nginx", partial(curl, *put, "-T", str(via), f"{url}/api/v1/uploads/{via_sha}"))
            step("PUT direct", partial(curl, *put, "-T", str(direct), f"{hub_url}/api/v1/uploads/{direct_sha}"))
            via.unlink()
            direct.unlink()
            if rnd == 0:
                curl(*put, "-T", str(weights), f"{url}/api/v1/uploads/{digest}")
                commit = json.dumps({"slug": "bench-base", "files": [
                    {"path": "model.safetensors", "sha256": digest}, {"path": "config.json", "sha256": config_sha}]})
                curl("-H", auth, "-H", "Content-Type: application/json", "--data-binary", commit,
                     url + "/api/v1/base-models/")
            step("download via nginx", lambda: curl("-H", auth, "-o", str(out), file_url))
            assert out.stat().st_size == nbytes and sha256_file(out) == digest, "download differs from upload"
            out.unlink()
            step("download via nginx to /dev/null", lambda: curl("-H", auth, "-o", "/dev/null", file_url))
            step("range via nginx", lambda: curl("-H", auth, "-r", f"{lo}-{hi}", "-o", str(out), file_url),
                 nb=hi - lo + 1)
            assert out.stat().st_size == hi - lo + 1, "range has the wrong length"
            out.unlink()
        left = [p for p in (blobs / ".nginx-body").rglob("*") if p.is_file()]
        assert not left, f"nginx left its body files: {left}"
        rows, copy_mb_s, rw_copy_mb_s = summarize(samples, anchors, mb)
        return {"size_mb": mb, "storage": f"fs+{front}", "copy_mb_s": copy_mb_s, "rw_copy_mb_s": rw_copy_mb_s,
                "anchors_mb_s": [{k: round(mb / v) for k, v in a.items()} for a in anchors],
                "steps": rows, "load": os.getloadavg()}
    finally:
        if nginx is not None:
            stop(nginx)
        if hub is not None:
            stop(hub)
        shutil.rmtree(work, ignore_errors=True)


def main():
    global SETTLE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, nargs="+", default=[512])
    ap.add_argument("--storage", choices=["fs", "s3"], nargs="+", default=["fs"])
    ap.add_argument("--root", type=Path, default=ROOT, help="the source tree to serve (default: this one)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of every step and anchor (the medians are shown)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds idle after sync before each timed step")
    ap.add_argument("--only-downloads", action="store_true", help="upload and downloads only: no Range, no HF client")
    ap.add_argument("--front", choices=["nginx"], help="staged upload and download through this front server "
                    "(UPLOAD_ACCEL=nginx, BLOB_ACCEL=x-accel-redirect; filesystem blobs), beside a direct PUT")
    ap.add_argument("--body-buffer", default="1m", help="nginx client_body_buffer_size for --front (default 1m)")
    args = ap.parse_args()
    SETTLE = args.settle
    print(f"root {args.root}  load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}  cores {os.cpu_count()}")
    print("MB = 10^6 bytes. Medians of --repeat rounds. cp: coreutils cp (kernel copy); rw: read/write 8 MiB "
          "through user space")
    print(f"{'storage':>8} {'MB':>6} {'step':>32} {'MB/s':>6} {'x cp':>5} {'x rw':>5} {'web CPU s/GB':>12} "
          f"{'RSS +MB':>7} {'RSS peak':>8} {'nginx CPU s/GB':>14}  samples MB/s")
    results = []
    runs = [(storage, size) for storage in args.storage for size in args.size_mb]
    if args.front:
        runs = [(f"fs+{args.front}", size) for size in args.size_mb]
    for storage, size in runs:
        if args.front:
            r = run_front(args.root, size, args.front, args.body_buffer, args.repeat)
        else:
            r = run_once(args.root, size, storage, args.repeat, args.only_downloads)
        results.append(r)
        print(f"{storage:>8} {r['size_mb']:6.0f} {'anchors: cp / rw copy':>32} {r['copy_mb_s']:6.0f} / "
              f"{r['rw_copy_mb_s']:.0f}  (rounds: {r['anchors_mb_s']}; load1 {r['load'][0]:.2f})")
        for name, s in r["steps"].items():
            front = f"{s['front_cpu_s_per_gb']:14.2f}" if "front_cpu_s_per_gb" in s else f"{'-':>14}"
            print(f"{storage:>8} {r['size_mb']:6.0f} {name:>32} {s['mb_s']:6.0f} {s['mb_s'] / r['copy_mb_s']:5.2f} "
                  f"{s['mb_s'] / r['rw_copy_mb_s']:5.2f} {s['cpu_s_per_gb']:12.2f} {s['rss_growth_mb']:7.1f} "
                  f"{s['rss_peak_mb']:8.0f} {front}  {s['samples_mb_s']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
