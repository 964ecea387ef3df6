"""Appending a benchmark's tables to `bench/RESULTS.md`, headed by what they ran on: date, GPU, torch, commit and
the exact command, so every figure there can be traced and rerun."""

import datetime
import shlex
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = RESULTS.parent.parent


def default_path(smoke: bool) -> str:
    """Where a run writes by default: RESULTS.md, except smoke runs (tiny architecture), which write nothing."""
    return "" if smoke else str(RESULTS)


def commit(root: Path = ROOT) -> str:
    """The checkout's commit, marked `+changes` when tracked files differ from it (the figures are then not
    that commit's alone); "unknown" outside a git checkout."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if rev.returncode or not rev.stdout.strip():
        return "unknown (not a git checkout)"
    return rev.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return names[0] if len(names) == 1 else f"{len(names)}x {names[0]}"
    return "CPU"


def invocation() -> list[str]:
    """How this process was started: `-m bench.NAME ARGS` for a module run (the way the README runs them)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name, *sys.argv[1:]]
    return sys.argv


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def append(path: str, title: str, device: str, tables: list[str]) -> None:
    """Append `tables` under a heading naming the date, GPU, torch, commit and command; `path` "" writes nothing."""
    if not path:
        return
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", *invocation()])
    heading = f"\n## {now} · {device_name(device)} · torch {torch.__version__} · commit {commit()}\n"
    body = "\n\n".join([f"{title}, `{command}`:", *tables])
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{heading}\n{body}\n")
    print(f"appended the tables to {path}", flush=True)
