"""The flow model's forward replayed as one CUDA graph per input shape.

A compiled 1024x1024 step launches about two thousand kernels from 57 separately compiled blocks, and the GPU
sits idle between them for about a tenth of the step (bench/RESULTS.md). Replaying the whole forward as one
captured graph removes those gaps. The graph reads the model's weights in place, so LoRA fusing (which
copies into the same tensors) needs no recapture; moving the model to another device does, which is why
the pipeline never graphs an offloaded flow model. The rotary embedding depends only on the position ids, so
it is computed once per image outside the graph and fed in like the other inputs.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
from loguru import logger
from torch import Tensor, nn


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]  # static buffers the graph reads
    output: Tensor  # static buffer the graph writes


class GraphedFlow:
    """Call like the model (keyword tensors); shapes seen before replay their graph, new ones are captured.

    At most `max_graphs` shapes are kept (least recently used dropped). A shape whose capture fails runs
    eagerly from then on, with one warning. Not thread-safe: the pipeline calls it under its lock.
    """

    def __init__(self, model: nn.Module, max_graphs: int = 8):
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.failed: set[tuple] = set()
        self.pool = None  # one memory pool for all graphs: they never run at the same time
        self._pe: tuple[Tensor, Tensor, Tensor] | None = None  # (img_ids, txt_ids, their rotary embedding)

    def __call__(self, **inputs: Tensor | None) -> Tensor:
        inputs = self._with_pe(inputs)
        key = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items() if v is not None)
        if key in self.failed:
            return self.model(**inputs)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(key, inputs)
            if captured is None:
                return self.model(**inputs)
        self.graphs.move_to_end(key)
        for name, buffer in captured.inputs.items():
            buffer.copy_(inputs[name])
        with torch.cuda.device(captured.output.device):  # the model may live on another GPU than the current one
            captured.graph.replay()
            return captured.output.clone()  # the static buffer is overwritten by the next replay

    def modulation_table(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        return self.model.modulation_table(timesteps, y, guidance)  # outside the graph: once per image

    def _with_pe(self, inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """The rotary embedding outside the graph, once per image: the denoising loop passes the same id tensors
        at every step (kept referenced here, so their identity cannot be reused by other tensors)."""
        img_ids, txt_ids = inputs.pop("img_ids"), inputs.pop("txt_ids")
        if self._pe is None or self._pe[0] is not img_ids or self._pe[1] is not txt_ids:
            self._pe = (img_ids, txt_ids, self.model.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)))
        return dict(inputs, img_ids=None, txt_ids=None, pe=self._pe[2])

    def reset(self) -> None:
        """Drop every graph (needed after the model's tensors move)."""
        self.graphs.clear()
        self.failed.clear()
        self._pe = None

    def _capture(self, key: tuple, inputs: dict[str, Tensor | None]) -> _Captured | None:
        static = {k: v.clone() for k, v in inputs.items() if v is not None}
        absent = {k: None for k, v in inputs.items() if v is None}
        device = next(iter(static.values())).device
        try:
            with torch.cuda.device(device):
                return self._capture_on(key, static, absent, device)
        except Exception as e:  # an op that cannot be captured: this shape runs eagerly
            logger.warning(f"CUDA graph capture failed for shapes {_shapes(key)}, running eagerly: {e}")
            self.failed.add(key)
            return None

    def _capture_on(self, key: tuple, static: dict[str, Tensor], absent: dict, device: torch.device) -> _Captured:
        # warm up on a side stream first: lazy initialisation and compilation must not happen while capturing
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.model(**static, **absent)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.model(**static, **absent)
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        captured = _Captured(graph, static, output)
        self.graphs[key] = captured
        logger.info(f"captured the flow model's forward as a CUDA graph for shapes {_shapes(key)}")
        return captured


def _shapes(key: tuple) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape, _, _ in key)
