import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from configs.make_tiny_demo import flow_state_dict
from flux_pipeline import FluxPipeline
from tests.helpers import TINY_CONFIG


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    """The demo config as a dict with absolute paths."""
    data = json.loads(TINY_CONFIG.read_text())
    for key in ("ckpt_path", "ae_path", "text_enc_path", "clip_path"):
        data[key] = str(TINY_CONFIG.parent / data[key])
    return data


@pytest.fixture(scope="session")
def flow_params(tiny_cfg) -> dict:
    return tiny_cfg["params"]


@pytest.fixture(scope="session")
def bf16_pipeline(tiny_cfg):

    return FluxPipeline.load_pipeline_from_config(dict(tiny_cfg, flow_quantization_dtype="bfloat16"))


@pytest.fixture(scope="session")
def fp8_pipeline(tiny_cfg):

    return FluxPipeline.load_pipeline_from_config(dict(tiny_cfg))


@pytest.fixture(scope="session")
def base(tmp_path_factory, flow_params):
    """A float32 checkpoint of the tiny architecture, written to disk, and its state dict (the LoRA tests')."""
    sd = flow_state_dict(flow_params, seed=5, dtype=torch.float32)
    path = tmp_path_factory.mktemp("base") / "flux-f32.safetensors"
    save_file(sd, path)
    return path, sd


@pytest.fixture
def write_json(tmp_path):
    def write(data: dict, name: str = "config.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return path

    return write
