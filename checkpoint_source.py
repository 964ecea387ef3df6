"""Reading a flow model's layers back from its checkpoint file, as loading made them: the source of pristine weights
that LoRA unloads restore from, instead of a host copy of every touched layer (11 GiB for FLUX.1 in fp8).

The file is read with `os.preadv` by a few threads into a small ring of staging buffers (pinned for a CUDA
device) and copied to the device chunk by chunk, so nothing of the file stays in the process's memory: the
operating system's page cache holds it while memory is free, and gives it back when not. Each tensor then goes
through the loader's own conversion (`float8_quantize.tensor_converter`: a prequantized file's tensors as they
are, a bf16 file's weights quantized on the same device with the same code), so what comes back is bit for bit
what loading put in the model; `LoraFuser` checks that once per layer before it relies on it.
"""

import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
CKPT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # a prefix every key shares (ComfyUI's) is dropped
LEAVES = ("weight", "weight_scale", "bias")
CHUNK = 16 << 20  # bytes per read
BUFFERS = 8  # staging buffers (and reads in flight): 128 MiB of host memory in all
THREADS = 8

Convert = Callable[[str, Tensor], dict[str, Tensor]]


def shared_prefix(keys: list[str]) -> str:
    """The `CKPT_PREFIXES` entry every key starts with, or ""."""
    return next((p for p in CKPT_PREFIXES if keys and all(k.startswith(p) for k in keys)), "")


def file_identity(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class CheckpointSource:
    """The tensors of a safetensors checkpoint's linear layers, by module name, converted by `convert(key, tensor)`
    (the loader's), on `device`."""

    def __init__(self, path: str | Path, convert: Convert, device: torch.device):
        self.path = str(path)
        self.convert = convert
        self.device = torch.device(device)
        self.identity = file_identity(path)
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        prefix = shared_prefix(list(header))
        self.tensors = {key[len(prefix) :]: meta for key, meta in header.items()}
        self._buffers: list[Tensor] | None = None
        self._events: list = []

    def changed(self) -> bool:
        """Whether the file on disk is no longer the one loaded (replaced, rewritten)."""
        try:
            return file_identity(self.path) != self.identity
        except OSError:
            return True

    def has(self, name: str) -> bool:
        return f"{name}.weight" in self.tensors

    def read(self, names: list[str]) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """(name, {leaf: tensor}) for each layer of `names`, in that order; the next layers are read while the caller
        works on one."""
        cuda = self.device.type == "cuda"
        buffers = self._staging(cuda)
        inflight: deque = deque()
        issued: deque = deque()  # layers read or being read, not yet handed out: [name, {key: raw}, chunks left]
        turn = 0
        with open(self.path, "rb", buffering=0) as f, ThreadPoolExecutor(THREADS) as pool:
            fd = f.fileno()

            def land(chunk) -> None:
                future, k, raw, offset, n, layer = chunk
                future.result()
                raw[offset : offset + n].copy_(buffers[k][:n], non_blocking=cuda)
                if cuda:
                    self._events[k].record()
                layer[2] -= 1

            for name in names:
                layer = [name, {}, 0]
                issued.append(layer)
                for leaf in LEAVES:
                    meta = self.tensors.get(f"{name}.{leaf}")
                    if meta is None:
                        continue
                    start, end = meta["data_offsets"]
                    raw = torch.empty(end - start, dtype=torch.uint8, device=self.device)
                    layer[1][f"{name}.{leaf}"] = raw
                    for offset in range(0, end - start, CHUNK):
                        n = min(CHUNK, end - start - offset)
                        if len(inflight) >= len(buffers):
                            land(inflight.popleft())
                        k = turn % len(buffers)
                        turn += 1
                        if cuda:
                            self._events[k].synchronize()  # its last copy to the device is done
                        future = pool.submit(_pread, fd, buffers[k], n, self.data_start + start + offset)
                        inflight.append((future, k, raw, offset, n, layer))
                        layer[2] += 1
                # the layers before this one are complete once their chunks have landed: hand them out
                while issued[0] is not layer:
                    while issued[0][2]:
                        land(inflight.popleft())
                    yield self._layer(issued.popleft())
            while inflight:
                land(inflight.popleft())
            while issued:
                yield self._layer(issued.popleft())

    def _layer(self, layer: list) -> tuple[str, dict[str, Tensor]]:
        name, raws, _ = layer
        out: dict[str, Tensor] = {}
        for key, raw in raws.items():
            meta = self.tensors[key]
            tensor = raw.view(DTYPES[meta["dtype"]]).view(meta["shape"])
            out.update(self.convert(key, tensor))
        return name, {key.rpartition(".")[2]: t for key, t in out.items() if key.rpartition(".")[0] == name}

    def _staging(self, cuda: bool) -> list[Tensor]:
        if self._buffers is None:
            self._buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=cuda) for _ in range(BUFFERS)]
            self._events = [torch.cuda.Event() for _ in range(BUFFERS)] if cuda else []
        return self._buffers


def _pread(fd: int, buffer: Tensor, n: int, offset: int) -> None:
    view = memoryview(buffer.numpy())[:n]
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"checkpoint ended {n - done} bytes early at offset {offset + done}")
        done += got
