"""Where a one-image run's start-up goes, with a warm compile cache: imports, CUDA, load, warm-up, image.

    python -m bench.profile_startup --workdir /tmp/fluxbench --top 40

Uses bench_serving's full-size random checkpoint set (written if missing) and fills a `--cache-dir` with one
cold run if it is empty. Then, with the warm caches: the plain run (phases from its log), the run with
`TORCHINDUCTOR_COMPILE_THREADS=1`, the run under `python -X importtime` (slowest imports, cumulative), and
`main.main()` under cProfile (the functions with the most cumulative and own time).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_serving import one_image_args, run_logged, startup, write_files

ROOT = Path(__file__).resolve().parent.parent
PROFILE = """
import cProfile, pstats, sys
sys.argv = ["main.py", *{argv!r}]
import main
cProfile.run("main.main()", {stats!r})
p = pstats.Stats({stats!r})
p.sort_stats("cumulative").print_stats({top})
p.sort_stats("tottime").print_stats({top})
"""


def slowest_imports(log: Path, top: int) -> list[str]:
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), len(m.group(3)), m.group(4)))
    rows.sort(reverse=True)
    return [f"{us / 1e6:6.2f} s  depth {depth:2d}  {name}" for us, depth, name in rows[:top]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/fluxbench")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default=None, help="folder for the logs (default: the workdir)")
    args = ap.parse_args()
    work = Path(args.workdir)
    out = Path(args.out or work)
    out.mkdir(parents=True, exist_ok=True)
    config = write_files(work)
    cache = work / "cache-profile"
    result = {}
    if not cache.exists():
        result["cold"] = startup(config, cache, out / "cold.log")
        print("cold", json.dumps(result["cold"]), flush=True)
    env = dict(os.environ)
    argv = [*one_image_args(config, out / "image.jpg"), "--cache-dir", str(cache)]
    t = time.time()
    cuda = subprocess.run([sys.executable, "-c", "import torch, time; t = time.perf_counter(); "
                           "torch.empty(1, device='cuda'); print(time.perf_counter() - t)"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    result["import torch + first CUDA tensor"] = {"total_s": round(time.time() - t, 2), "cuda_s": cuda.stdout}
    result["warm"] = run_logged([sys.executable, str(ROOT / "main.py"), *argv], env, out / "warm.log")
    print("warm", json.dumps(result["warm"]), flush=True)
    env1 = dict(env, TORCHINDUCTOR_COMPILE_THREADS="1")
    result["warm, compile threads 1"] = run_logged([sys.executable, str(ROOT / "main.py"), *argv], env1, out / "t1.log")
    print("threads 1", json.dumps(result["warm, compile threads 1"]), flush=True)
    imports = out / "importtime.log"
    result["importtime"] = run_logged([sys.executable, "-X", "importtime", str(ROOT / "main.py"), *argv], env, imports)
    stats = out / "startup.prof"
    script = PROFILE.format(argv=argv, stats=str(stats), top=args.top)
    profile_log = out / "cprofile.log"
    result["cprofile"] = run_logged([sys.executable, "-c", script], env, profile_log)
    print(json.dumps(result, indent=1))
    print("\n== slowest imports (cumulative)")
    print("\n".join(slowest_imports(imports, args.top)))
    text = profile_log.read_text(errors="replace")
    for head in ("cumulative", "tottime"):
        start = text.find("Ordered by: " + head)
        lines = text[start:].splitlines()[: args.top + 4] if start >= 0 else []
        print(f"\n== cProfile by {head}")
        print("\n".join(line[:150] for line in lines))


if __name__ == "__main__":
    main()
