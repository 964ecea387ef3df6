import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main_gr
from cache_dir import use_cache_dir
from float8_quantize import F8Linear
from flux_pipeline import WARM_UP_SIZES, FluxPipeline
from main import build_pipeline, config_overrides, parse_args
from serving.settings import ServerSettings
from tests.helpers import ROOT, TINY_CONFIG


def test_flags_map_to_config_keys():
    args = parse_args(
        [
            "-c",
            "x.json",
            "-f",
            "flow.safetensors",
            "-t",
            "t5dir",
            "-a",
            "ae.safetensors",
            "-m",
            "flux-schnell",
            "-F",
            "cuda:1",
            "-T",
            "cpu",
            "-A",
            "cuda:0",
            "-C",
            "-qT",
            "bf16",
            "-qA",
            "-OF",
            "-OA",
            "-OT",
            "-PF",
            "-nqfm",
            "-qfl",
            "-q",
            "20",
        ]
    )
    assert config_overrides(args) == {
        "ckpt_path": "flow.safetensors", "text_enc_path": "t5dir", "ae_path": "ae.safetensors",
        "version": "flux-schnell", "flux_device": "cuda:1", "text_enc_device": "cpu", "ae_device": "cuda:0",
        "compile_blocks": True, "compile_extras": True, "text_enc_quantization_dtype": "bfloat16",
        "ae_quantization_dtype": "qfloat8", "offload_flow": True, "offload_vae": False,
        "offload_text_encoder": False, "prequantized_flow": True, "quantize_modulation": False,
        "quantize_flow_embedder_layers": True,
    }  # fmt: skip
    defaults = parse_args([])
    assert config_overrides(defaults) == {} and defaults.host == "127.0.0.1" and defaults.port == 8088


def test_one_image_mode_warms_up_at_its_own_size_only(monkeypatch, tmp_path, tiny_cfg):

    warmed = []  # the sizes each load compiles and warms up at (the warm-up itself is a GPU test)
    monkeypatch.setattr(
        FluxPipeline, "compile", lambda self, sizes=WARM_UP_SIZES, batch=1: warmed.append((sizes, batch))
    )
    build_pipeline(parse_args(["-c", str(TINY_CONFIG), "-C", "--prompt", "a fox", "--width", "512", "--height", "384"]))
    build_pipeline(parse_args(["-c", str(TINY_CONFIG), "-C"]))  # a server warms up at the sizes requests use
    assert warmed == [(((512, 384), (512, 384)), 1), (WARM_UP_SIZES, ServerSettings.max_batch)]
    # with a compile-cache artifact beside the checkpoint, at the server's sizes it holds (its own size reuses them)
    ckpt = tmp_path / "flux.safetensors"
    shutil.copy(tiny_cfg["ckpt_path"], ckpt)
    (tmp_path / "flux.safetensors.compile-cache").write_bytes(b"stands for an artifact")
    warmed.clear()
    args = ["-c", str(TINY_CONFIG), "-C", "-f", str(ckpt), "--prompt", "a fox", "--width", "512", "--height", "384"]
    build_pipeline(parse_args(args))
    assert warmed == [(WARM_UP_SIZES, 1)]


def test_flags_override_the_config_file():
    from encoder_quantize import F8EncoderLinear

    pipe = build_pipeline(parse_args(["-c", str(TINY_CONFIG), "-qT", "qfloat8", "-nqfm", "-qfl"]))
    assert pipe.config.text_enc_quantization_dtype == "qfloat8"
    assert any(isinstance(m, F8EncoderLinear) for m in pipe.t5.modules())  # --quant-text-enc qfloat8 quantizes
    assert not isinstance(pipe.model.double_blocks[0].img_mod.lin, F8Linear)
    assert isinstance(pipe.model.img_in, F8Linear)


def test_bad_flag_value_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "main.py", "-c", str(TINY_CONFIG), "-F", "gpu7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "flux_device" in out.stderr and "Traceback" not in out.stderr


def test_cache_dir_that_cannot_be_made_is_a_clear_error(tmp_path, monkeypatch):

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(sys, "pycache_prefix", sys.pycache_prefix)  # restored even if the call went wrong
    with pytest.raises(SystemExit, match="--cache-dir"):
        use_cache_dir(str(blocker / "cache"))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ or str(blocker) not in os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert parse_args([]).cache_dir == os.environ.get("FLUX_CACHE_DIR")
    monkeypatch.setenv("FLUX_CACHE_DIR", str(tmp_path / "from-env"))
    assert parse_args([]).cache_dir == str(tmp_path / "from-env")


def test_cache_dir_uses_installed_bytecode_and_keeps_the_rest(tmp_path):
    """A package that ships bytecode beside its source is loaded from it; one without gets its bytecode in the cache
    folder, never beside the source (PYTHONDONTWRITEBYTECODE, as in container images)."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    for name in ("shipped", "plain"):
        (site / name).mkdir(parents=True)
    source = site / "shipped" / "__init__.py"
    source.write_text("X = 'from the bytecode'\n")
    # unchecked: not compared with the source, so the module's value says which of the two was loaded
    py_compile.compile(str(source), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH, doraise=True)
    source.write_text("X = 'from the source'\n")
    (site / "plain" / "__init__.py").write_text("X = 'plain'\n")
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); from cache_dir import use_cache_dir; "
        f"use_cache_dir({str(cache)!r}); import shipped, plain; print(shipped.X); print(shipped.__cached__); "
        "print(plain.__cached__)"
    )
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    value, shipped_cached, plain_cached = run.stdout.split("\n")[:3]
    assert value == "from the bytecode" and Path(shipped_cached).parent == site / "shipped" / "__pycache__"
    assert Path(plain_cached).is_relative_to(cache / "pycache") and Path(plain_cached).is_file()
    assert not (site / "plain" / "__pycache__").exists()


def test_main_gr_starts_the_server_with_the_ui_at_root(monkeypatch):
    seen = []
    monkeypatch.setattr(main_gr.main, "main", seen.append)
    main_gr.run(["--config", "configs/config-tiny-cpu.json", "--port", "7861", "--lora-dir", "loras"])
    args = parse_args(seen[0])
    assert (args.config_path, args.port, args.ui, args.ui_at_root) == ("configs/config-tiny-cpu.json", 7861, True, True)
    assert args.lora_dir == "loras" and args.host == "127.0.0.1"
    with pytest.raises(SystemExit, match="--share"):
        main_gr.run(["--share"])
