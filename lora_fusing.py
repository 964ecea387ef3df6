"""Fusing LoRAs into the flow model's weights, with exact unloads.

Weights are always `pristine + sum of the loaded LoRAs' deltas`: unloading the last LoRA restores the exact original
tensors, and a change that fails is undone the same way (the weights and the loaded set are what they were before
it). Where the pristine tensors come back from, per layer, first that applies:
- a copy in the flow model's own GPU memory, while the GPU has room to spare (`device_room`): the fastest, and no
  host memory (a whole-model swap on an H200 is bound by reading and fusing the LoRA, bench/RESULTS.md);
- the checkpoint file (`checkpoint_source`), read and converted as loading did and checked bit for bit once;
- a host copy, for a layer the file cannot give back exactly (or with no file).
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from checkpoint_source import CheckpointSource
from errors import LoraError, LoraNotLoaded
from float8_quantize import F8Linear, dequantize_weight, quantize_weight
from lora_loading import LoraDeltas, convert_lora, read_lora

GIB = 2**30
# what GPU copies of pristine weights leave free for generating (activations, batches, the allocator's slack):
# the larger of this and a quarter of the card
DEVICE_RESERVE = 16 * GIB


@dataclass
class LoadedLora:
    name: str
    path: str | None
    scale: float
    deltas: LoraDeltas
    ignored: list[str] = field(default_factory=list)  # the file's keys that were not applied


@dataclass
class LoraFuser:
    """Keeps `model`'s touched layers equal to pristine + the sum of every loaded LoRA's delta.

    The first time a LoRA touches a layer, its way back is settled: with a `source` (the checkpoint file), the
    layer's tensors are read from it and compared with the model's, and if equal the file is where the layer is
    restored from (`file_backed`: no memory held); otherwise (or without a source) the tensors are copied to host
    memory and kept. Before either, while `device_room()` allows, the layer is copied in the GPU memory it lives in
    (`device_gib`: None sizes that room from the free memory, 0 turns it off, a number caps it). Layers that hold
    their pristine values (not in `dirty`) are read in place: loading onto them reads nothing. `pin_backups`: host
    copies in pinned memory (faster swaps, slower to take; bench_lora).
    """

    model: nn.Module
    pin_backups: bool = True
    source: CheckpointSource | None = None
    device_gib: float | None = None
    loaded: dict[str, LoadedLora] = field(default_factory=dict)
    pristine: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)  # GPU or host copies
    file_backed: set[str] = field(default_factory=set)  # layers the source gives back bit for bit
    dirty: set[str] = field(default_factory=set)  # layers that hold pristine + deltas

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def check(self, deltas: LoraDeltas) -> None:
        modules = self.modules()
        for name, parts in deltas.items():
            module = modules.get(name)
            if not isinstance(module, (nn.Linear, F8Linear)):
                raise LoraError(f"LoRA targets {name!r}, which is not a linear layer of this model")
            for p in parts:
                rows = p.rows or (0, module.out_features)
                if (
                    p.down.shape[1] != module.in_features
                    or p.up.shape[0] != rows[1] - rows[0]
                    or rows[1] > module.out_features
                ):
                    raise LoraError(
                        f"LoRA shapes for {name!r} do not fit the layer ({module.in_features} in, "
                        f"{module.out_features} out)"
                    )
                if p.bias is not None and module.bias is None:
                    raise LoraError(f"LoRA has a bias for {name!r}, which has none")

    def put(self, lora: LoadedLora) -> None:
        """Load `lora` (or replace the loaded one of its name): all of it, or nothing."""
        self.check(lora.deltas)
        previous = self.loaded.get(lora.name)
        self._change({**self.loaded, lora.name: lora}, set(lora.deltas) | _layers(previous))

    def replace(self, loaded: dict[str, LoadedLora]) -> None:
        """Make `loaded` the whole loaded set in one change (all of it, or nothing): each layer that any removed, added
        or rescaled LoRA touches is computed once from its pristine tensors, not restored and then fused again."""
        changed = {n: lora for n, lora in loaded.items() if self.loaded.get(n) is not lora}
        for lora in changed.values():
            self.check(lora.deltas)
        layers = set().union(*(set(lora.deltas) for lora in changed.values()))
        for name, lora in self.loaded.items():
            if loaded.get(name) is not lora:
                layers |= set(lora.deltas)
        self._change(dict(loaded), layers)

    def remove(self, name: str) -> LoadedLora:
        lora = self.loaded[name]
        self._change({n: other for n, other in self.loaded.items() if n != name}, set(lora.deltas))
        return lora

    def _change(self, loaded: dict[str, LoadedLora], layers: set[str]) -> None:
        """Make `loaded` the loaded set and refresh `layers`; on any failure the loaded set and every weight go
        back to what they were (recomputed from the pristine copies, as they were computed before)."""
        before, self.loaded = self.loaded, loaded
        try:
            self._refresh(layers)
        except BaseException:
            self.loaded = before
            self._refresh(layers)
            raise

    @torch.no_grad()
    def back_up(self) -> int:
        """Settle every linear layer's way back now (those not settled yet); returns how many."""
        names = {n for n, m in self.modules().items() if isinstance(m, (nn.Linear, F8Linear))}
        return self._settle(names)

    @torch.no_grad()
    def _settle(self, names: set[str]) -> int:
        """Give each layer of `names` that has none a way back to its pristine tensors: a copy on its GPU while
        `device_room` allows, the checkpoint file where it gives them back bit for bit, else a host copy. Runs
        before anything changes them; returns how many layers it settled."""
        modules = self.modules()
        new = sorted(n for n in names if n not in self.pristine and n not in self.file_backed)
        assert not self.dirty.intersection(new)  # a dirty layer always has its way back: settled before the change
        if not new:
            return 0
        settled, room = len(new), self.device_room()
        for name in new:
            size = _bytes(_state(modules[name]))
            if size <= room:
                self.pristine[name] = tuple(t.clone() for t in _state(modules[name]))
                room -= size
        new = [n for n in new if n not in self.pristine]
        from_file = [n for n in new if self.source is not None and self.source.has(n)]
        if from_file:
            self._check_source()
            matched = {name for name, leaves in self.source.read(from_file)
                       if _bits_equal(_state(modules[name]), _assemble(modules[name], leaves))}  # fmt: skip
            self.file_backed |= matched
            if len(matched) < len(from_file):
                logger.warning(
                    f"{len(from_file) - len(matched)} layers differ from {self.source.path} (e.g. "
                    f"{sorted(set(from_file) - matched)[:3]}): their pristine weights are kept in host memory"
                )
        for name in new:
            if name not in self.file_backed:
                self.pristine[name] = tuple(_host_copy(t, self.pin_backups) for t in _state(modules[name]))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return settled

    def _check_source(self) -> None:
        if self.source.changed():
            raise LoraError(
                f"the flow checkpoint {self.source.path} changed on disk since it was loaded: LoRA changes need the "
                "file the model was loaded from (restart to load the new one)"
            )

    def device_room(self) -> int:
        """Bytes of GPU memory that more pristine copies may take: up to `device_gib` if set, and never past what
        leaves the card `DEVICE_RESERVE` or a quarter of it free (0 off a GPU)."""
        device = next(self.model.parameters()).device
        if device.type != "cuda" or self.device_gib == 0:
            return 0
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's cache
        room = free - max(DEVICE_RESERVE, total // 4)
        if self.device_gib is not None:
            room = min(room, int(self.device_gib * GIB) - self.device_bytes())
        return max(room, 0)

    def host_bytes(self) -> int:
        """Host memory the pristine copies hold."""
        return sum(_bytes(ts) for ts in self.pristine.values() if ts[0].device.type == "cpu")

    def device_bytes(self) -> int:
        """GPU memory the pristine copies hold."""
        return sum(_bytes(ts) for ts in self.pristine.values() if ts[0].device.type != "cpu")

    def device_layers(self) -> int:
        return sum(1 for ts in self.pristine.values() if ts[0].device.type != "cpu")

    @torch.no_grad()
    def _refresh(self, names: set[str]) -> None:
        self._settle(names)
        modules = self.modules()
        ordered = sorted(names)
        reread = [n for n in ordered if n in self.dirty and n in self.file_backed]
        if reread:
            self._check_source()
        from_file = iter(self.source.read(reread)) if reread else iter(())
        finite: dict[str, Tensor] = {}  # per layer, on its device: read once at the end, one wait, not one a layer
        for name in ordered:
            module = modules[name]
            state = _state(module)
            if name in self.dirty and name in self.file_backed:
                read_name, leaves = next(from_file)
                assert read_name == name
                orig = _assemble(module, leaves)
            elif name in self.dirty:
                orig = tuple(t.to(module.weight.device, non_blocking=True) for t in self.pristine[name])
            else:
                orig = state
            parts = [(p, lora.scale) for lora in self.loaded.values() for p in lora.deltas.get(name, [])]
            if not parts:  # nothing left on this layer: the exact original tensors
                if name in self.dirty:
                    for t, o in zip(state, orig, strict=True):
                        t.copy_(o, non_blocking=True)
                    self.dirty.discard(name)
                continue
            device = module.weight.device
            # float32 working copies (never views of the pristine tensors)
            if isinstance(module, F8Linear):
                weight = dequantize_weight(orig[0], orig[1])
            else:
                weight = orig[0].to(device, torch.float32, copy=True)
            bias = orig[-1].to(device, torch.float32, copy=True) if module.bias is not None else None
            # DoRA's parts are relative to the pristine weight (each normalizes it with its own delta)
            base = weight.clone() if any(p.magnitude is not None for p, _ in parts) else None
            for p, scale in parts:
                rows = slice(*p.rows) if p.rows else slice(None)
                p.add_to(weight[rows], scale, None if base is None else base[rows])
                b = p.bias_delta(scale)
                if b is not None:
                    bias[rows] += b.to(device)
            if isinstance(module, F8Linear):
                # whole (the chunks that keep loading lean would only add kernel launches here): the same values;
                # the working copy is consumed, and a NaN or inf anywhere shows in the scale
                q, s = quantize_weight(weight, module.weight_scaling == "per_channel", weight.shape[0], consume=True)
                finite[name] = torch.isfinite(s).all()
                module.weight.copy_(q)
                module.weight_scale.copy_(s)
            else:
                finite[name] = torch.isfinite(weight).all()
                module.weight.copy_(weight)
            if bias is not None:
                finite[name] &= torch.isfinite(bias).all()
                module.bias.copy_(bias)
            self.dirty.add(name)
        by_device: dict[torch.device, list[Tensor]] = {}
        for flag in finite.values():
            by_device.setdefault(flag.device, []).append(flag)
        if not all(torch.stack(flags).all().item() for flags in by_device.values()):
            bad = [name for name, f in finite.items() if not f.item()]  # `_change` puts the weights back
            raise LoraError(f"the LoRAs' sum overflows (values too large for the layer) in {bad[:5]}")
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # copies finished: the change is complete when this returns


def _layers(lora: LoadedLora | None) -> set[str]:
    return set(lora.deltas) if lora is not None else set()


def _assemble(module: nn.Module, leaves: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """A layer's tensors from the checkpoint, in `_state`'s order."""
    tensors = [leaves["weight"]]
    if isinstance(module, F8Linear):
        tensors.append(leaves["weight_scale"])
    if module.bias is not None:
        tensors.append(leaves["bias"])
    return tuple(tensors)


def _bits_equal(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    """Whether two tuples of tensors hold the same bits."""
    if len(a) != len(b) or any(x.dtype != y.dtype or x.numel() != y.numel() for x, y in zip(a, b, strict=True)):
        return False
    return all(
        torch.equal(x.reshape(-1).view(torch.uint8), y.to(x.device).reshape(-1).view(torch.uint8))
        for x, y in zip(a, b, strict=True)
    )


def _bytes(tensors: tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _host_copy(t: Tensor, pinned: bool) -> Tensor:
    """A host copy of `t`; pinned, it is taken without waiting (same-stream order keeps it safe)."""
    if t.device.type != "cuda" or not pinned:
        return t.detach().to("cpu", copy=True)
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    return host.copy_(t.detach(), non_blocking=True)


def _state(module: nn.Module) -> tuple[Tensor, ...]:
    """The tensors a LoRA may change, in place-copyable form: (weight[, weight_scale][, bias])."""
    tensors = [module.weight.data]
    if isinstance(module, F8Linear):
        tensors.append(module.weight_scale)
    if module.bias is not None:
        tensors.append(module.bias.data)
    return tuple(tensors)


class PipelineLoras:
    """Mixed into `FluxPipeline`: its LoRA methods. Needs `loras` (a LoraFuser), `lock`, `config` and
    `flux_device`."""

    def load_lora(
        self,
        lora: str | Path | dict[str, Tensor] | None = None,
        scale: float = 1.0,
        name: str | None = None,
        *,
        lora_path: str | Path | dict[str, Tensor] | None = None,
    ) -> str:
        """Fuse a LoRA (a .safetensors path or a state dict) into the flow model; returns its name.

        Loading a name that is already loaded replaces it (same file, new scale: only the scale changes).
        `lora_path` is the original's name for `lora`."""
        lora = lora if lora is not None else lora_path
        if lora is None:
            raise LoraError("load_lora needs a path or a state dict")
        _check_scale(scale)
        path = str(lora) if isinstance(lora, (str, Path)) else None
        name = name or (Path(path).stem if path else f"lora_{len(self.loras.loaded)}")
        with self.lock:
            current = self.loras.loaded.get(name)
            if current is not None and path is not None and current.path == path:
                deltas, ignored = current.deltas, current.ignored
            else:
                deltas, ignored = self._read_deltas(*(read_lora(path) if path else (lora, {})))
            start = time.perf_counter()
            self.loras.put(LoadedLora(name, path, float(scale), deltas, ignored))
            logger.info(
                f"LoRA {name!r} (scale {scale}) fused into {len(deltas)} layers in {time.perf_counter() - start:.2f} s"
            )
        return name

    def set_loras(self, wanted: dict[str, tuple[str, float]]) -> int:
        """Make the fused LoRAs exactly `wanted` ({name: (path, scale)}) in one change: a LoRA whose name and path are
        loaded already keeps its deltas (a new scale only rescales), the others are read; unchanged layers are not
        touched. Returns the loads and unloads it made (0: nothing to do)."""
        for _path, scale in wanted.values():
            _check_scale(scale)
        with self.lock:
            current = self.loras.loaded
            new: dict[str, LoadedLora] = {}
            changes = sum(1 for n, lora in current.items() if n not in wanted or wanted[n][0] != lora.path)
            for name, (path, scale) in wanted.items():
                old = current.get(name)
                if old is not None and old.path == str(path) and old.scale == float(scale):
                    new[name] = old
                    continue
                changes += 1
                if old is not None and old.path == str(path):
                    deltas, ignored = old.deltas, old.ignored
                else:
                    deltas, ignored = self._read_deltas(*read_lora(str(path)))
                new[name] = LoadedLora(name, str(path), float(scale), deltas, ignored)
            if not changes:
                return 0
            start = time.perf_counter()
            self.loras.replace(new)
            logger.info(
                f"LoRAs set to {sorted(new) or 'none'} ({changes} loads and unloads) in "
                f"{time.perf_counter() - start:.2f} s"
            )
        return changes

    def _read_deltas(self, sd: dict[str, Tensor], metadata: dict[str, str]) -> tuple[LoraDeltas, list[str]]:
        """A LoRA's checked deltas on the flow model's device, and the keys it does not apply."""
        ignored: list[str] = []
        deltas = convert_lora(sd, self.config.params.hidden_size, metadata, ignored)
        return {k: [_to_device(p, self.flux_device) for p in v] for k, v in deltas.items()}, ignored

    def prepare_loras(self) -> None:
        """Settle every linear layer's way back to its pristine weights now, so that no LoRA load pays for it later.

        Layers are copied on the GPU while it has room (`lora_vram_gib`); of the rest, those whose checkpoint file
        gives them back bit for bit (read once now, and compared) cost no memory, and the others are copied to host
        memory (11 GiB in fp8 for all of FLUX.1). Taken on demand, the first LoRA covering
        the whole model would wait for this (seconds; bench/RESULTS.md). The server does it at start-up with
        `--lora-dir`."""
        with self.lock:
            start = time.perf_counter()
            settled = self.loras.back_up()
            logger.info(
                f"LoRA restore sources for {settled} layers settled in {time.perf_counter() - start:.1f} s: "
                f"{self.loras.device_layers()} copied on the GPU ({self.loras.device_bytes() / GIB:.2f} GiB), "
                f"{len(self.loras.file_backed)} from the checkpoint file, "
                f"{len(self.loras.pristine) - self.loras.device_layers()} in host memory "
                f"({self.loras.host_bytes() / GIB:.2f} GiB)"
            )

    def unload_lora(self, name_or_path: str | None = None, *, path_or_identifier: str | None = None) -> None:
        """Unfuse a loaded LoRA, by name or path (`path_or_identifier`: the original's keyword)."""
        name_or_path = name_or_path if name_or_path is not None else path_or_identifier
        with self.lock:
            match = [n for n, lora in self.loras.loaded.items() if name_or_path in (n, lora.path)]
            if not match:
                raise LoraNotLoaded(f"no LoRA named {name_or_path!r} is loaded")
            for name in match:
                self.loras.remove(name)
                logger.info(f"LoRA {name!r} unloaded")

    def list_loras(self) -> list[dict[str, Any]]:
        return [{"name": n, "path": lora.path, "scale": lora.scale} for n, lora in self.loras.loaded.items()]


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"LoRA scale must be a finite number, got {scale!r}")


def _to_device(part, device: torch.device):
    part.down, part.up = part.down.to(device), part.up.to(device)
    part.bias = None if part.bias is None else part.bias.to(device)
    return part
