"""Serving benchmarks on full-size random checkpoints written to disk: start-up to first image, and replicas.

    python -m bench.bench_serving --workdir /tmp/fluxbench --out $OUT/serving.json

1. Writes a full-size random FLUX.1-dev checkpoint set the way users have it on disk: a prequantized fp8 flow
   model (`float8_quantize.py`'s format), a BFL autoencoder file, and T5-XXL and CLIP-L as `transformers`
   folders (the tiny demo's tokenizers), plus a config (`configs/config-dev-1-H100.json` with these paths and
   `prequantized_flow: true`; compile on, T5 qfloat8 as shipped).
2. Start-up to first image: `main.py --prompt ... --output ...` (load, compile and warm-up, one 28-step
   1024x1024 image, exit), timed from process start to exit, with an empty `--cache-dir` and again with the
   caches the first run left (and with its compile caches but no bytecode cache, as without `--cache-dir`);
   then a server (`main.py -c ...`) with those caches, from process start to ready (/health) and to its
   first 1024x1024 28-step image, and the same server restarted (the first compiled the warm-up sizes the
   one-image runs never saw). Each with the times its log lines were written.
   With `--startup-runs`, a chosen list instead (`write-artifact`, `cold-artifact`, `server-warm`, `cold`,
   `cold-quanto`): writing the compile-cache artifact (`main.py --write-compile-cache`) or taking one given with
   `--compile-cache`, a one-image run with an empty `--cache-dir` and the artifact next to the checkpoint, a
   server started with the cache that run left, and the same one-image run without the artifact (with our fp8 T5,
   and with optimum-quanto's, whose CUDA extension builds at a cold start).
3. Replicas: `replicas.py` with one, then two GPUs; a bounded load test from 127.0.0.1 (`--per-replica`
   clients per replica, each sending 1024x1024 28-step requests to the replica with the fewest requests in
   flight, as nginx `least_conn` does) for `--seconds`; images per minute.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path

import httpx
import torch

from bench import report
from cache_dir import COMPILE_CACHES

ROOT = Path(__file__).resolve().parent.parent

REQUEST = {"prompt": "a lighthouse at dusk, oil painting", "width": 1024, "height": 1024, "num_steps": 28}


def write_files(work: Path, device: str = "cuda", tiny_model: bool = False) -> Path:
    """The checkpoint set and its config; returns the config path (kept if it exists). `tiny_model`: the demo's
    architecture (a smoke test of this script)."""
    config_path = work / "config.json"
    if config_path.exists():
        return config_path
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    import float8_quantize as f8
    from bench.bench_e2e import random_encoders
    from bench.bench_flow import architecture_config, random_model, random_weights_config
    from modules.autoencoder import AutoEncoder, AutoEncoderParams
    from util import spec_from_dict

    work.mkdir(parents=True, exist_ok=True)
    cfg = architecture_config(tiny_model)
    cfg.update(
        ckpt_path=str(work / "flux1-dev-fp8.safetensors"), ae_path=str(work / "ae.safetensors"),
        text_enc_path=str(work / "t5"), clip_path=str(work / "clip"), prequantized_flow=True,
    )  # fmt: skip
    t = time.perf_counter()
    model = f8.quantize_flow_model(random_model(cfg["params"], device, torch.bfloat16), f8.F8Settings())
    # the metadata needs a validated config before the files it names exist
    spec = spec_from_dict(random_weights_config(tiny_model))
    f8.save_prequantized(
        model, cfg["ckpt_path"], f8.metadata_for(spec.f8_settings, spec.params.model_dump(), spec.flow_dtype)
    )
    del model
    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderParams(**cfg["ae_params"]))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, cfg["ae_path"])
    clip, t5 = random_encoders(tiny_model, device, torch.bfloat16)
    for name, embedder in (("t5", t5), ("clip", clip)):
        embedder.hf_module.save_pretrained(work / name)
        AutoTokenizer.from_pretrained(ROOT / "configs" / "tiny" / name).save_pretrained(work / name)
    del clip, t5
    config_path.write_text(json.dumps(cfg, indent=2))
    print(f"wrote the checkpoint set to {work} in {time.perf_counter() - t:.0f} s", flush=True)
    return config_path


def cache_env(cache: Path) -> dict[str, str]:
    """The compile caches of `main.py --cache-dir cache` set through the environment, without its bytecode."""
    return dict(os.environ, **{var: str(cache / sub) for var, sub in COMPILE_CACHES.items()})


def log_offsets(log: Path, launched: float) -> dict[str, float]:
    """Seconds from launch to the first log line containing each marker (loguru timestamps, local time)."""
    markers = {"imported": "imported the pipeline's code", "loaded": "pipeline in", "warmed_up": "warmed up",
               "image_written": "wrote ", "serving": "serving on"}  # fmt: skip
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        for key, marker in markers.items():
            if key not in found and marker in line:
                found[key] = round(stamp - launched, 2)
    return found


def one_image_args(config: Path, out: Path) -> list[str]:
    """main.py's arguments for the benchmark's one image (28 steps, 1024x1024, seed 1), written to `out`."""
    return ["-c", str(config), "--prompt", REQUEST["prompt"], "--output", str(out), "--width", "1024",
            "--height", "1024", "--num-steps", "28", "--seed", "1"]  # fmt: skip


def run_logged(cmd: list[str], env: dict, log: Path, timeout: float = 400) -> dict:
    """Runs `cmd` to its end with its output in `log`: exit code, seconds from launch to exit, and when each phase
    ended (`log_offsets`)."""
    launched = time.time()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    return {"exit": code, "total_s": round(time.time() - launched, 2), "phases_s": log_offsets(log, launched)}


def startup(config: Path, cache: Path, log: Path, cache_dir: bool = True) -> dict:
    """Seconds from process start to exit of a one-image run (load, compile + warm-up, 28 steps, JPEG), and when
    each phase ended. `cache_dir`: with `--cache-dir cache` (compile caches and bytecode), else the compile caches
    only."""
    out = log.with_suffix(".jpg")
    cmd = [sys.executable, str(ROOT / "main.py"), *one_image_args(config, out)]
    cmd += ["--cache-dir", str(cache)] if cache_dir else []
    result = run_logged(cmd, dict(os.environ) if cache_dir else cache_env(cache), log)
    if result.pop("exit") != 0 or not out.exists():
        raise SystemExit(f"one-image run failed; see {log}")
    return result


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within two minutes."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def server_startup(config: Path, cache: Path, log: Path, port: int = 8290) -> dict:
    """A server from process start: until /health says ready, and until its first 1024x1024 28-step image."""
    cmd = [sys.executable, str(ROOT / "main.py"), "-c", str(config), "--port", str(port), "--cache-dir", str(cache)]
    url = f"http://127.0.0.1:{port}"
    launched = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(timeout=120) as http:
            deadline = time.time() + 400
            while time.time() < deadline and proc.poll() is None:  # bounded
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit(f"server did not become ready; see {log}")
            ready = time.time() - launched
            r = http.post(f"{url}/generate", json=dict(REQUEST, seed=1))
            if r.status_code != 200 or r.content[:2] != b"\xff\xd8":
                raise SystemExit(f"first request failed ({r.status_code}); see {log}")
            first = time.time() - launched
    finally:
        stop(proc)
    return {"ready_s": round(ready, 2), "first_image_s": round(first, 2), "phases_s": log_offsets(log, launched)}


@contextmanager
def nginx_front(nginx: str, ports: list[int], work: Path):
    """deploy/nginx.conf (least_conn) run by `nginx` on 127.0.0.1 in front of `ports`, every path it writes under
    `work`; yields its URL."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    lines = [line for line in conf.splitlines() if line.strip().startswith("server flux-gpu")]
    conf = conf.replace("\n".join(lines), "\n".join(f"        server 127.0.0.1:{p};" for p in ports))
    conf = conf.replace("listen 8088;", "listen 127.0.0.1:8380;")
    temp = "\n".join(
        f"    {kind}_temp_path {work}/nginx-{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {", "http {\n    access_log off;\n" + temp, 1)
    conf = conf.replace("worker_processes auto;", f"worker_processes 4;\npid {work}/nginx.pid;")
    (work / "nginx.conf").write_text(conf)
    (work / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(nginx).parent)}
    cmd = [nginx, "-e", "stderr", "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=(work / "nginx.err").open("w"))
    time.sleep(1.0)
    if proc.poll() is not None:
        raise SystemExit(f"nginx did not start: {(work / 'nginx.err').read_text()[-500:]}")
    try:
        yield "http://127.0.0.1:8380"
    finally:
        proc.terminate()
        proc.wait(10)


def load_test(
    config: Path,
    devices: list[str],
    port: int,
    per_replica: int,
    seconds: float,
    log: Path,
    cache: Path,
    nginx: str | None = None,
) -> dict:
    cmd = [sys.executable, str(ROOT / "replicas.py"), "--devices", ",".join(devices), "--base-port", str(port),
           "--", "-c", str(config), "--cache-dir", str(cache)]  # fmt: skip
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    try:
        line = proc.stdout.readline()
        if "ready" not in line:
            raise SystemExit(f"replicas did not start: {line!r}; see {log}")
        ready_s = time.perf_counter() - t
        urls = [f"http://127.0.0.1:{port + i}" for i in range(len(devices))]
        front = nginx_front(nginx, [port + i for i in range(len(devices))], log.parent) if nginx else nullcontext()
        proxy = front.__enter__()
        if proxy:  # every client through the real nginx front (least_conn there)
            urls = [proxy]
        in_flight = dict.fromkeys(urls, 0)
        lock = threading.Lock()
        done, failed, latencies = [], [], []
        deadline = time.monotonic() + seconds

        def client(k: int) -> None:
            seed = 1000 * k
            with httpx.Client(timeout=120) as http:
                while time.monotonic() < deadline:  # bounded: no request starts after the deadline
                    with lock:
                        url = min(urls, key=lambda u: in_flight[u])  # least connections
                        in_flight[url] += 1
                    start = time.monotonic()
                    try:
                        r = http.post(f"{url}/generate", json=dict(REQUEST, seed=seed))
                        ok = r.status_code == 200 and r.content[:2] == b"\xff\xd8"
                    except httpx.HTTPError:
                        ok = False
                    finally:
                        with lock:
                            in_flight[url] -= 1
                    end = time.monotonic()
                    (done if ok else failed).append(end)
                    latencies.append(end - start)
                    seed += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(per_replica * len(devices))]
        begin = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(seconds + 300)
        front.__exit__(None, None, None)
        window = max(done) - begin if done else seconds
        ordered = sorted(latencies)
        return {
            "replicas": len(devices),
            "clients": len(threads),
            "front": "nginx least_conn" if nginx else "client-side least connections",
            "ready_s": ready_s,
            "images": len(done),
            "failed": len(failed),
            "window_s": window,
            "images_per_min": 60 * len(done) / window,
            "median_latency_s": ordered[len(ordered) // 2] if ordered else None,
            "p95_latency_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None,
        }
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/fluxbench")
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--per-replica", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--replica-overrides", default="{}", help="JSON config keys for the replicas (e.g. compile off)")
    ap.add_argument("--nginx", help="an nginx binary: the load goes through deploy/nginx.conf in front of the replicas")
    ap.add_argument("--replica-counts", help="which replica counts to run, e.g. '1' or '1,2' (default 1..gpus)")
    ap.add_argument("--startup-runs", help="comma list of: write-artifact, cold-artifact, server-warm, cold, "
                    "cold-quanto (see the module's doc); replaces the default start-up runs")  # fmt: skip
    ap.add_argument("--compile-cache", help="a compile-cache artifact to use (else write-artifact writes one)")
    ap.add_argument("--out")
    ap.add_argument("--results", default=str(report.RESULTS), help="append the tables here ('' for nowhere)")
    args = ap.parse_args()
    if args.startup_runs == "":
        args.skip_startup = True
    work = Path(args.workdir)
    config = write_files(work)
    result = {"request": REQUEST}
    cache = work / f"cache-{int(time.time())}"  # empty: the first start-up compiles from scratch

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)

    if args.startup_runs:
        startup_runs(args, config, work, result, save)
    elif not args.skip_startup:
        result["startup_cold_cache"] = startup(config, cache, work / "startup-cold.log")
        save()
        result["startup_warm_cache"] = startup(config, cache, work / "startup-warm.log")
        save()
        # the same compile caches through the environment, no bytecode cache: what a start without --cache-dir
        # costs where the installation has no .pyc files (PYTHONDONTWRITEBYTECODE images)
        result["startup_warm_compile_cache_only"] = startup(config, cache, work / "startup-nobytecode.log", False)
        save()
        # the one-image runs cached their own size only: this server compiles its other warm-up sizes (768x768)
        result["server_startup_warm_cache"] = server_startup(config, cache, work / "server-warm.log")
        save()
        # a restart, as a deployment restarts: every size it warms up at is in the cache now
        result["server_restart"] = server_startup(config, cache, work / "server-restart.log")
        save()
    overrides = json.loads(args.replica_overrides)
    if overrides:
        result["replica_overrides"] = overrides
        replica_config = work / "config-replicas.json"
        replica_config.write_text(json.dumps(dict(json.loads(config.read_text()), **overrides), indent=2))
        config = replica_config
    if args.replica_counts is None:
        counts = range(1, args.gpus + 1)
    else:  # "" runs none
        counts = [int(n) for n in args.replica_counts.split(",") if n]
    for n in counts:
        devices = [f"cuda:{i}" for i in range(n)]
        log = work / f"replicas-{n}.log"
        result[f"replicas_{n}"] = load_test(
            config, devices, 8300, args.per_replica, args.seconds, log, cache, args.nginx
        )
        save()
    if "replicas_1" in result and f"replicas_{args.gpus}" in result and args.gpus >= 2:
        result["scaling"] = result[f"replicas_{args.gpus}"]["images_per_min"] / result["replicas_1"]["images_per_min"]
    save()
    tables = results_tables(result)
    print("\n" + "\n\n".join(tables))
    r = REQUEST
    title = f"Start-up and serving ({r['width']}x{r['height']}, {r['num_steps']} steps; phases from process start)"
    report.append(args.results, title, "cuda", tables)


def startup_runs(args, config: Path, work: Path, result: dict, save) -> None:
    """The start-up runs around the compile-cache artifact (`--startup-runs`)."""
    import shutil

    import compile_cache

    runs = args.startup_runs.split(",")
    checkpoint = json.loads(config.read_text())["ckpt_path"]
    beside = compile_cache.default_path(checkpoint)
    artifact = Path(args.compile_cache) if args.compile_cache else work / "artifact.compile-cache"
    stamp = int(time.time())
    if "write-artifact" in runs:
        cmd = [sys.executable, str(ROOT / "main.py"), "-c", str(config), "--cache-dir", str(work / f"cache-w{stamp}"),
               "--write-compile-cache", str(artifact)]  # fmt: skip
        result["write_artifact"] = run_logged(cmd, dict(os.environ), work / "write-artifact.log", timeout=500)
        result["write_artifact"]["artifact_mib"] = round(artifact.stat().st_size / 2**20, 1) if artifact.exists() else 0
        save()
    cache = work / f"cache-a{stamp}"  # empty: only the artifact can spare the compile
    if "cold-artifact" in runs:
        shutil.copy(artifact, beside)
        result["startup_cold_artifact"] = startup(config, cache, work / "startup-cold-artifact.log")
        save()
    if "server-warm" in runs:
        shutil.copy(artifact, beside)
        result["server_warm_artifact"] = server_startup(config, cache, work / "server-warm-artifact.log")
        save()
    beside.unlink(missing_ok=True)
    if "cold" in runs:
        result["startup_cold_no_artifact"] = startup(config, work / f"cache-c{stamp}", work / "startup-cold.log")
        save()
    if "cold-quanto" in runs:
        quanto = work / "config-quanto.json"
        cfg = dict(json.loads(config.read_text()), text_enc_quantization_dtype="quanto_qfloat8")
        quanto.write_text(json.dumps(cfg))
        result["startup_cold_quanto"] = startup(quanto, work / f"cache-q{stamp}", work / "startup-cold-quanto.log")
        save()


STARTUPS = {
    "write_artifact": "`--write-compile-cache` (empty `--cache-dir`): compile, warm up, write",
    "startup_cold_artifact": "one image, empty `--cache-dir`, the artifact beside the checkpoint",
    "server_warm_artifact": "server, the `--cache-dir` that run left, the artifact beside: ready / first response",
    "startup_cold_no_artifact": "one image, empty `--cache-dir`, no artifact (our fp8 T5)",
    "startup_cold_quanto": "one image, empty `--cache-dir`, no artifact, optimum-quanto's qfloat8 T5",
    "startup_cold_cache": "one image, empty `--cache-dir`",
    "startup_warm_cache": "one image, warm `--cache-dir`",
    "startup_warm_compile_cache_only": "one image, the compile caches through the environment, no bytecode cache",
    "server_startup_warm_cache": "server, `--cache-dir` warmed by the one-image runs: ready / first response",
    "server_restart": "server restarted (its warm-up sizes cached): ready / first response",
}


def results_tables(result: dict) -> list[str]:
    tables = []
    rows = []
    for key, label in STARTUPS.items():
        if key in result:
            run = result[key]
            phases = run["phases_s"]
            total = f"{run['ready_s']} / {run['first_image_s']}" if "ready_s" in run else run["total_s"]
            rows.append([label, total, *(phases.get(p, "-") for p in ("imported", "loaded", "warmed_up"))])
    if rows:
        tables.append(report.table(["run", "total s", "imports done", "loaded", "warmed up"], rows))
    replicas = [v for k, v in result.items() if k.startswith("replicas_") and isinstance(v, dict)]
    if replicas:
        header = ["replicas", "clients", "front", "ready s", "images", "failed", "images/min", "p50 s", "p95 s"]
        keys = ["replicas", "clients", "front", "ready_s", "images", "failed", "images_per_min", "median_latency_s",
                "p95_latency_s"]  # fmt: skip
        rows = [[f"{r[k]:.2f}" if isinstance(r.get(k), float) else r.get(k, "-") for k in keys] for r in replicas]
        tables.append(report.table(header, rows))
    return tables


if __name__ == "__main__":
    main()
