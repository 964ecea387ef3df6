"""The project installs as a package: `pip wheel .` builds it, and the installed `flux-fp8-api` command serves the
tiny demo (here: makes one image) from outside the checkout, started as container images start it: no bytecode
beside the installed sources (PYTHONDONTWRITEBYTECODE) and a `--cache-dir` that keeps it instead, where the
installation ships none."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

from tests.helpers import ROOT, TINY_CONFIG


def test_the_wheel_installs_and_its_command_makes_an_image(tmp_path):
    source, dist = tmp_path / "source", tmp_path / "dist"  # built from a copy: the build leaves files behind
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "__pycache__", "*.egg-info"))
    build = subprocess.run(
        # the build backend from requirements-test.txt: no isolated environment to make and fill
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("flux_fp8_api-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("main.py", "api.py", "flux_pipeline.py", "float8_quantize.py", "lora_loading.py", "util.py",
                 "kernels/fp8_linear.py", "modules/flux_model.py", "serving/worker.py", "configs/config-tiny-cpu.json",
                 "configs/tiny/flux-tiny.safetensors", "configs/tiny/t5/spiece.model"):  # fmt: skip
        assert name in names, name
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    # a venv that sees this machine's packages (torch and the rest) but not the checkout
    venv = tmp_path / "venv"
    venv_cmd = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)]
    subprocess.run(venv_cmd, check=True, timeout=120)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(venv / "bin" / "python"),
        "install",
        "-q",
        "--no-deps",
        "--no-compile",  # as images built with PYTHONDONTWRITEBYTECODE install: no bytecode beside the sources
        str(wheel),
    ]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    out, cache = tmp_path / "a.jpg", tmp_path / "cache"
    cmd = [str(venv / "bin" / "flux-fp8-api"), "--config-path", str(TINY_CONFIG), "--prompt", "x", "--width", "256",
           "--height", "128", "--num-steps", "2", "--output", str(out), "--cache-dir", str(cache)]  # fmt: skip
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Image.open(out).size == (256, 128)
    # the cache holds the bytecode of what the command imported, its own modules and installed packages alike
    tag = sys.implementation.cache_tag
    own = list((cache / "pycache").rglob(f"flux_pipeline.{tag}.pyc"))
    assert len(own) == 1 and str(venv.resolve().relative_to("/")) in str(own[0]) and own[0].stat().st_size > 1000
    # an installed package's own bytecode is used where it ships one (pip writes it unless told not to)
    torch_init = importlib.util.find_spec("torch").origin
    shipped = (Path(torch_init).parent / "__pycache__" / f"__init__.{tag}.pyc").is_file()
    assert any((cache / "pycache").rglob(f"torch/__init__.{tag}.pyc")) != shipped
    assert f"start-up caches in {cache.resolve()}" in run.stderr
    where = [str(venv / "bin" / "python"), "-c", "import flux_pipeline; print(flux_pipeline.__file__)"]
    assert subprocess.run(where, capture_output=True, text=True, cwd="/").stdout.startswith(str(venv))
