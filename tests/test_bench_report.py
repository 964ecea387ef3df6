"""The benchmarks append their tables to RESULTS.md with date, device, torch, commit and command."""

import json
import os
import re
import subprocess
import sys

import torch

from bench import report
from tests.helpers import ROOT

FLOW = [sys.executable, "-m", "bench.bench_flow", "--tiny", "--device", "cpu", "--sizes", "64x64", "--reps", "2",
        "--modes", "fp8 ch/tok", "--eager", "bf16,fp8 ch/tok", "--compile", ""]  # fmt: skip


def run_flow(*extra: str) -> None:
    subprocess.run([*FLOW, *extra], cwd=ROOT, check=True, capture_output=True, timeout=300)


def test_bench_flow_appends_its_tables_with_what_they_ran_on(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier runs\n")
    run_flow("--results", str(results))
    run_flow("--results", str(results), "--reps", "3")
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nearlier runs\n")  # appended, nothing lost
    headings = re.findall(r"^## (\d{4}-\d\d-\d\d \d\d:\d\d UTC) · (.+) · torch (\S+) · commit (.+)$", text, re.M)
    assert len(headings) == 2
    for _, device, version, commit in headings:
        assert (device, version, commit) == ("CPU", torch.__version__, report.commit())
    assert "`python -m bench.bench_flow --tiny --device cpu --sizes 64x64 --reps 2 " in text
    assert "--reps 2 --modes 'fp8 ch/tok'" in text and "--reps 3`" in text  # the exact commands, quoted
    for section in text.split("\n## ")[1:]:
        accuracy = re.findall(r"^\| (bf16|fp8 ch/tok) \| (\d+\.\d\d)% / (\d+\.\d\d)% \| (\d+\.\d\d)% / ", section, re.M)
        assert [row[0] for row in accuracy] == ["bf16", "fp8 ch/tok"]
        assert all(0 < float(median) <= float(worst) < 100 for _, median, worst, _ in accuracy)
        timing = re.findall(r"^\| (bf16|fp8 ch/tok) eager 64x64 \| (\d+\.\d) \| (\d+\.\d\d) \|", section, re.M)
        assert [row[0] for row in timing] == ["bf16", "fp8 ch/tok"]
        for _, ms, its in timing:  # it/s = 1000 / ms, up to the printed rounding of ms
            assert 1000 / (float(ms) + 0.05) - 0.01 <= float(its) <= 1000 / max(float(ms) - 0.05, 1e-3) + 0.01


def test_commit_names_the_checkout_and_marks_changes(tmp_path):
    def git(*args: str) -> str:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # fmt: skip
        return subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout

    assert report.commit(tmp_path).startswith("unknown")  # not a checkout: said so, never a made-up commit
    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    sha = git("rev-parse", "--short", "HEAD").strip()
    assert report.commit(tmp_path) == sha
    (tmp_path / "new.txt").write_text("untracked")  # untracked files do not change the figures' code
    assert report.commit(tmp_path) == sha
    (tmp_path / "a.txt").write_text("two")
    assert report.commit(tmp_path) == f"{sha} +changes"


def test_serving_tables_put_each_run_in_its_row():
    from bench.bench_serving import results_tables

    phases = {"imported": 4.3, "loaded": 10.24, "warmed_up": 15.63, "image_written": 18.15}
    result = {
        "request": {"prompt": "p", "width": 1024, "height": 1024, "num_steps": 28},
        "startup_cold_cache": {"total_s": 122.01, "phases_s": dict(phases, loaded=96.0)},
        "startup_warm_cache": {"total_s": 18.43, "phases_s": phases},
        "server_startup_warm_cache": {"ready_s": 23.51, "first_image_s": 26.02, "phases_s": {"imported": 4.76}},
        "server_restart": {"ready_s": 20.5, "first_image_s": 23.0, "phases_s": {"warmed_up": 19.9}},
        "replicas_1": {
            "replicas": 1,
            "clients": 2,
            "ready_s": 25.1,
            "images": 20,
            "failed": 0,
            "window_s": 60.0,
            "images_per_min": 20.0,
            "median_latency_s": 5.3,
            "front": "nginx least_conn",
            "p95_latency_s": 6.1,
        },  # fmt: skip
        "scaling": 1.0,
    }
    startup, replicas = results_tables(result)
    assert startup.splitlines()[2:] == [
        "| one image, empty `--cache-dir` | 122.01 | 4.3 | 96.0 | 15.63 |",
        "| one image, warm `--cache-dir` | 18.43 | 4.3 | 10.24 | 15.63 |",
        "| server, `--cache-dir` warmed by the one-image runs: ready / first response | 23.51 / 26.02 | 4.76 | - | - |",
        "| server restarted (its warm-up sizes cached): ready / first response | 20.5 / 23.0 | - | - | 19.9 |",
    ]
    assert replicas.splitlines()[2:] == ["| 1 | 2 | nginx least_conn | 25.10 | 20 | 0 | 20.00 | 5.30 | 6.10 |"]


def test_bench_flow_measures_the_fp8_attention_beside_the_default(tmp_path):
    """...as a smoke run (`--tiny` without `--results`), which writes nowhere."""
    out = tmp_path / "flow.json"
    fast = "fp8 ch/tok + fp8 attention"
    before = report.RESULTS.read_bytes()
    run_flow("--fp8-attention", "--eager", f"fp8 ch/tok,{fast}", "--out", str(out))
    assert report.RESULTS.read_bytes() == before
    assert report.default_path(smoke=False) == str(report.RESULTS) and report.default_path(smoke=True) == ""
    result = json.loads(out.read_text())
    default, opt_in = result["accuracy"]["fp8 ch/tok"], result["accuracy"][fast]
    assert opt_in["per_linear"] == default["per_linear"]  # the same linears
    assert opt_in["per_block"]["median"] != default["per_block"]["median"]  # its blocks' own error, reported
    assert {f"{v} eager 64x64" for v in ("fp8 ch/tok", fast)} == set(result["timing"])
