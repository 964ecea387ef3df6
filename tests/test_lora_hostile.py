"""LoRA changes are all or nothing: a file or state dict that cannot be applied leaves the weights and the list of
loaded LoRAs exactly as they were, and says which key is wrong (`LoraError`)."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from errors import LoraError
from flux_pipeline import FluxPipeline

H = 64  # the tiny model's hidden size (mlp_ratio 4, 64 input channels)


@pytest.fixture
def pipe(tiny_cfg) -> FluxPipeline:
    return FluxPipeline.load_pipeline_from_config(dict(tiny_cfg))


def weights(pipe: FluxPipeline) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.model.state_dict().items()}


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8))]
    assert not changed, changed[:5]


def good_pair(name: str, rows: int, cols: int, seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.lora_A.weight": torch.randn(rank, cols, generator=g) * 0.1,
            f"{name}.lora_B.weight": torch.randn(rows, rank, generator=g) * 0.1}  # fmt: skip


GOOD = good_pair("double_blocks.0.img_attn.proj", H, H)
BAD_STATE_DICTS = {
    "bias of the wrong length": {
        **GOOD,
        **good_pair("single_blocks.0.linear1", 7 * H, H),
        "single_blocks.0.linear1.lora_B.bias": torch.zeros(5),
    },  # fmt: skip
    "rank 0": good_pair("double_blocks.0.txt_attn.proj", H, H, rank=0),
    "3-D lora_A": {"img_in.lora_A.weight": torch.zeros(4, 64, 1), "img_in.lora_B.weight": torch.zeros(H, 4)},
    "1-D lora_A": {"img_in.lora_A.weight": torch.zeros(64), "img_in.lora_B.weight": torch.zeros(H, 4)},
    "NaN in A": {**GOOD, "double_blocks.0.img_attn.proj.lora_A.weight": torch.full((4, H), float("nan"))},
    "Inf in B": {**GOOD, "double_blocks.0.img_attn.proj.lora_B.weight": torch.full((H, 4), float("inf"))},
    "NaN alpha": {**GOOD, "double_blocks.0.img_attn.proj.alpha": torch.tensor(float("nan"))},
    "negative alpha": {**GOOD, "double_blocks.0.img_attn.proj.alpha": torch.tensor(-4.0)},
    "integer weights": {
        "img_in.lora_A.weight": torch.ones(4, 64, dtype=torch.int32),
        "img_in.lora_B.weight": torch.ones(H, 4, dtype=torch.int32),
    },  # fmt: skip
    "a sum that overflows": {
        **GOOD,
        "double_blocks.0.img_attn.proj.lora_A.weight": torch.full((4, H), 1e30),
        "double_blocks.0.img_attn.proj.lora_B.weight": torch.full((H, 4), 1e30),
    },  # fmt: skip
    "rows that do not fit the layer": good_pair("double_blocks.0.img_attn.proj", H + 16, H),
}
BAD_METADATA = {
    "PEFT alpha nan": {"lora_adapter_metadata": json.dumps({"lora_alpha": "nan"})},
    "PEFT alpha 1e999": {"lora_adapter_metadata": '{"lora_alpha": 1e999}'},
    "PEFT metadata a list": {"lora_adapter_metadata": json.dumps([1, 2])},
    "PEFT alpha a dict": {"lora_adapter_metadata": json.dumps({"lora_alpha": {"a": 1}})},
    "PEFT metadata not JSON": {"lora_adapter_metadata": "{"},
}


@pytest.mark.parametrize("case", BAD_STATE_DICTS)
def test_a_bad_state_dict_changes_nothing(pipe, case):
    other = good_pair("single_blocks.1.linear2", H, 5 * H, seed=3)
    pipe.load_lora(other, name="kept")
    before, listed = weights(pipe), pipe.list_loras()
    with pytest.raises(LoraError):
        pipe.load_lora(BAD_STATE_DICTS[case], name="bad")
    assert_same(before, weights(pipe))
    assert pipe.list_loras() == listed
    pipe.unload_lora("kept")  # the earlier LoRA still unloads to the exact original weights
    pristine = FluxPipeline.load_pipeline_from_config(pipe.config.model_dump())
    assert_same(weights(pristine), weights(pipe))


@pytest.mark.parametrize("case", BAD_METADATA)
def test_bad_peft_metadata_is_refused(pipe, tmp_path, case):
    path = tmp_path / "peft.safetensors"
    save_file(GOOD, path, metadata=BAD_METADATA[case])
    before = weights(pipe)
    with pytest.raises(LoraError, match="lora_a|metadata"):
        pipe.load_lora(path)
    assert_same(before, weights(pipe)) and pipe.list_loras() == []


def _header(header: dict | bytes, body: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


MALFORMED = {
    "empty": b"",
    "text": b"these are not tensors\n",
    "a JPEG renamed": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200),
    "header length 10 GB": _header(b"{}", length=10 * 2**30),
    "header length 2^63": _header(b"{}", length=2**63),
    "header longer than the file": _header(b'{"a": 1}', length=100),
    "header not JSON": _header(b"{not json"),
    "offsets out of range": _header({"x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4096]}}),
    "overlapping offsets": _header(
        {
            "a.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "a.lora_B.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
    ),  # fmt: skip
    "unknown dtype": _header({"x.lora_A.weight": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_are_lora_errors(pipe, tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED[case])
    before = weights(pipe)
    with pytest.raises(LoraError, match="bad.safetensors"):
        pipe.load_lora(path)
    assert_same(before, weights(pipe))


def test_errors_name_the_key(pipe):
    with pytest.raises(LoraError, match=r"single_blocks\.0\.linear1.*bias"):
        pipe.load_lora(BAD_STATE_DICTS["bias of the wrong length"])
    with pytest.raises(LoraError, match=r"double_blocks\.0\.img_attn\.proj.*NaN"):
        pipe.load_lora(BAD_STATE_DICTS["NaN in A"])


def test_a_failed_rescale_keeps_the_loaded_scale(pipe, tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(GOOD, path)
    pipe.load_lora(path, scale=0.5, name="g")
    before = weights(pipe)
    with pytest.raises(LoraError, match="scale"):
        pipe.load_lora(path, scale=float("nan"), name="g")
    assert_same(before, weights(pipe))
    assert pipe.list_loras() == [{"name": "g", "path": str(path), "scale": 0.5}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_finiteness_from_the_exponent_bits_matches_isfinite(dtype):
    from lora_loading import all_finite

    finfo = torch.finfo(dtype)
    edge = torch.tensor([finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 4, 0.0, -0.0, 1.0], dtype=dtype)
    assert all_finite(edge) and all_finite(torch.randn(4097).to(dtype)) and all_finite(torch.empty(0, 8, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(4097).to(dtype)
        t[4000] = bad
        assert not all_finite(t) and not all_finite(t.reshape(17, 241))
