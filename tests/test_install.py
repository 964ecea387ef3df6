"""The project installs as a package: `pip wheel .` builds it, and the installed `flux-fp8-api` command serves the
tiny demo (here: makes one image) from outside the checkout."""

import shutil
import subprocess
import sys
import zipfile

from PIL import Image

from tests.helpers import ROOT, TINY_CONFIG


def test_the_wheel_installs_and_its_command_makes_an_image(tmp_path):
    source, dist = tmp_path / "source", tmp_path / "dist"  # built from a copy: the build leaves files behind
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "__pycache__", "*.egg-info"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
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
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    out = tmp_path / "a.jpg"
    cmd = [str(venv / "bin" / "flux-fp8-api"), "--config-path", str(TINY_CONFIG), "--prompt", "x",
           "--width", "128", "--height", "128", "--num-steps", "2", "--output", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Image.open(out).size == (128, 128)
    where = [str(venv / "bin" / "python"), "-c", "import flux_pipeline; print(flux_pipeline.__file__)"]
    assert subprocess.run(where, capture_output=True, text=True, cwd="/").stdout.startswith(str(venv))
