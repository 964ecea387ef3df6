"""Fusing LoRAs into the flow model's weights, with exact unloads.

Fusing keeps every touched layer's pristine weights in host memory, so weights are always `pristine + sum of the
loaded LoRAs' deltas`, unloading the last LoRA restores the exact original tensors, and a change that fails is
undone the same way: the weights and the loaded set are what they were before it.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from errors import LoraError, LoraNotLoaded
from float8_quantize import F8Linear, dequantize_weight, quantize_weight
from lora_loading import LoraDeltas, convert_lora, read_lora


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

    A layer's pristine tensors are copied to host memory the first time a LoRA touches it and kept from then on,
    so later loads, swaps and unloads move no weights off the GPU. Layers that hold their pristine values (not in
    `dirty`) are read in place: a swap uploads nothing either. `pin_backups`: the copies in pinned memory, which
    costs more to take once and makes every later swap several times faster (bench/RESULTS.md, bench_lora).
    """

    model: nn.Module
    pin_backups: bool = True
    loaded: dict[str, LoadedLora] = field(default_factory=dict)
    pristine: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)  # host copies
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
        """Take the pristine copies of every linear layer now (those not taken yet); returns how many."""
        taken = 0
        for name, module in self.modules().items():
            if isinstance(module, (nn.Linear, F8Linear)) and name not in self.pristine:
                self._keep_pristine(name, _state(module))
                taken += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return taken

    def _keep_pristine(self, name: str, state: tuple[Tensor, ...]) -> None:
        assert name not in self.dirty  # a dirty layer always has its copy: it was taken before the first change
        self.pristine[name] = tuple(_host_copy(t, self.pin_backups) for t in state)

    @torch.no_grad()
    def _refresh(self, names: set[str]) -> None:
        modules = self.modules()
        finite: dict[str, Tensor] = {}  # per layer, on its device: read once at the end, one wait, not one a layer
        for name in sorted(names):
            module = modules[name]
            state = _state(module)
            if name not in self.pristine:
                self._keep_pristine(name, state)
            parts = [(p, lora.scale) for lora in self.loaded.values() for p in lora.deltas.get(name, [])]
            if not parts:  # nothing left on this layer: the exact original tensors
                if name in self.dirty:
                    for t, orig in zip(state, self.pristine[name], strict=True):
                        t.copy_(orig, non_blocking=True)
                    self.dirty.discard(name)
                continue
            device = module.weight.device
            orig = (
                state if name not in self.dirty else tuple(t.to(device, non_blocking=True) for t in self.pristine[name])
            )
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
                weight[rows] += p.delta(scale, None if base is None else base[rows]).to(device)
                b = p.bias_delta(scale)
                if b is not None:
                    bias[rows] += b.to(device)
            finite[name] = torch.isfinite(weight).all() & (torch.isfinite(bias).all() if bias is not None else True)
            if isinstance(module, F8Linear):
                q, s = quantize_weight(weight, module.weight_scaling == "per_channel")
                module.weight.copy_(q)
                module.weight_scale.copy_(s)
            else:
                module.weight.copy_(weight)
            if bias is not None:
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
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise LoraError(f"LoRA scale must be a finite number, got {scale!r}")
        path = str(lora) if isinstance(lora, (str, Path)) else None
        name = name or (Path(path).stem if path else f"lora_{len(self.loras.loaded)}")
        with self.lock:
            current = self.loras.loaded.get(name)
            if current is not None and path is not None and current.path == path:
                deltas, ignored = current.deltas, current.ignored
            else:
                sd, metadata = read_lora(path) if path else (lora, {})
                ignored = []
                deltas = convert_lora(sd, self.config.params.hidden_size, metadata, ignored)
                deltas = {k: [_to_device(p, self.flux_device) for p in v] for k, v in deltas.items()}
            start = time.perf_counter()
            self.loras.put(LoadedLora(name, path, float(scale), deltas, ignored))
            logger.info(
                f"LoRA {name!r} (scale {scale}) fused into {len(deltas)} layers in {time.perf_counter() - start:.2f} s"
            )
        return name

    def prepare_loras(self) -> None:
        """Copy every linear layer's pristine weights to host memory now, so that no LoRA load pays for it later.

        LoRA fusing needs these copies to restore the exact weights; taken on demand, the first LoRA covering the
        whole model waits for all of them (seconds; bench/RESULTS.md). The server takes them at start-up with
        `--lora-dir`.
        Costs host memory the size of the flow model's linear weights (11 GiB in fp8 for FLUX.1)."""
        with self.lock:
            start = time.perf_counter()
            taken = self.loras.back_up()
            size = sum(t.numel() * t.element_size() for ts in self.loras.pristine.values() for t in ts)
            logger.info(
                f"LoRA backups: {taken} layers copied to host memory in {time.perf_counter() - start:.1f} s "
                f"({size / 2**30:.2f} GiB held)"
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


def _to_device(part, device: torch.device):
    part.down, part.up = part.down.to(device), part.up.to(device)
    part.bias = None if part.bias is None else part.bias.to(device)
    return part
