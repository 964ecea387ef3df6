"""FluxPipeline: owns the text encoders, the flow transformer and the autoencoder, and makes images."""

import gc
import io
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from loguru import logger
from PIL import Image
from torch import Tensor
from tqdm import tqdm

import compile_cache
from batching import ImageRequest, PipelineBatching
from checkpoint_source import CheckpointSource
from cuda_graphs import GraphedFlow
from errors import Cancelled, InvalidInput, LoraNotLoaded
from float8_quantize import match_device
from images import cover_crop, encode_image, to_tensor
from kernels.options import KernelOptions
from legacy import OriginalSurface
from lora_fusing import LoraFuser, PipelineLoras
from modules import sampling
from modules.conditioner import HFEmbedder
from modules.emphasis import parse_emphasis
from modules.sampling import StepCallback
from util import (
    DEFAULTS,
    ModelSpec,
    check_device,
    checkpoint_source,
    compile_artifact,
    import_text_encoder_code,
    load_autoencoder,
    load_config,
    load_flow_model,
    load_text_encoders,
    spec_from_dict,
    text_encoders_after_flow,
)

__all__ = ["FluxPipeline", "Cancelled", "LoraNotLoaded", "compile_flow_model", "WARM_UP_SIZES"]

# the most requested size first (its graph is static, the fastest), then one that compiles the dynamic graph
WARM_UP_SIZES = ((1024, 1024), (768, 768))


class FluxPipeline(PipelineBatching, PipelineLoras, OriginalSurface):
    """The whole model and its generation. The original project's names work too (`legacy.OriginalSurface`)."""

    def __init__(
        self,
        config: ModelSpec,
        model: torch.nn.Module,
        ae: torch.nn.Module,
        clip: HFEmbedder,
        t5: HFEmbedder,
        pin_lora_backups: bool = True,
        lora_source: CheckpointSource | None = None,
    ):
        self.config = config
        self.model = model
        self.ae = ae
        self.clip = clip
        self.t5 = t5
        self.flux_device = torch.device(config.flux_device)
        self.ae_device = torch.device(config.ae_device)
        self.text_enc_device = torch.device(config.text_enc_device)
        # one generation (or model change) at a time: they share the modules and the device memory
        self.lock = threading.RLock()
        # LoRA unloads restore from GPU copies where the card has room, else from the checkpoint file where it was
        # given, else from host copies (`lora_fusing`)
        self.loras = LoraFuser(model, pin_backups=pin_lora_backups, source=lora_source, device_gib=config.lora_vram_gib)
        # fusing a LoRA copies into the same weight tensors, so graphs stay valid; offloading moves them
        graphs = config.cuda_graphs and self.flux_device.type == "cuda" and not config.offload_flow
        self.step_model = GraphedFlow(model) if graphs else model

    @classmethod
    def load_pipeline_from_config_path(
        cls,
        path: str,
        flow_model_path: str | None = None,
        debug: bool = False,
        *,
        warm_up_sizes: tuple[tuple[int, int], ...] = WARM_UP_SIZES,
        options: KernelOptions = KernelOptions(),
        pin_lora_backups: bool = True,
        warm_up_batch: int = 1,
        use_compile_cache: bool = True,
        **overrides: Any,
    ) -> "FluxPipeline":
        """`load_pipeline_from_config` of a JSON config file; `overrides` are config keys, `flow_model_path` the
        checkpoint (`ckpt_path`) as in the original (whose `debug` is accepted and changes nothing)."""
        if flow_model_path is not None:
            overrides["ckpt_path"] = flow_model_path
        config = load_config(path, **overrides)
        return cls.load_pipeline_from_config(
            config, warm_up_sizes=warm_up_sizes, options=options, pin_lora_backups=pin_lora_backups,
            warm_up_batch=warm_up_batch, use_compile_cache=use_compile_cache,
        )  # fmt: skip

    @classmethod
    def load_pipeline_from_config(
        cls,
        config: ModelSpec | dict,
        debug: bool = False,
        *,
        warm_up_sizes: tuple[tuple[int, int], ...] = WARM_UP_SIZES,
        options: KernelOptions = KernelOptions(),
        pin_lora_backups: bool = True,
        warm_up_batch: int = 1,
        use_compile_cache: bool = True,
    ) -> "FluxPipeline":
        """Load every component; with compile on, load the compile cache (`compile_cache.py`) if there is one,
        compile and warm up at `warm_up_sizes`, and for batches up to `warm_up_batch` (see `compile`).
        `options`: which kernels the flow model and the autoencoder run; `pin_lora_backups`: see `LoraFuser`."""
        if isinstance(config, dict):
            config = spec_from_dict(config)
        with collector_paused():
            return cls._load(config, warm_up_sizes, options, pin_lora_backups, warm_up_batch, use_compile_cache)

    @classmethod
    def _load(
        cls,
        config: ModelSpec,
        warm_up_sizes: tuple[tuple[int, int], ...],
        options: KernelOptions,
        pin_lora_backups: bool,
        warm_up_batch: int,
        use_compile_cache: bool,
    ) -> "FluxPipeline":
        start = time.perf_counter()
        if config.compiles and use_compile_cache:  # before anything compiles: what it holds is found, not compiled
            artifact = compile_artifact(config)
            if artifact is not None:
                compile_cache.load(artifact)
        # offloaded components load on the CPU and visit their device only while they run
        cpu = {
            "text_enc_device": config.offload_text_encoder,
            "flux_device": config.offload_flow,
            "ae_device": config.offload_vae,
        }
        load_config = config.model_copy(update={k: "cpu" for k, offload in cpu.items() if offload})
        for key in cpu:  # a typo in a device is an error even when that component is offloaded
            check_device(getattr(config, key), key)
        phases: dict[str, float] = {}

        def timed(phase: str, load: Callable[[], Any]) -> Any:
            t = time.perf_counter()
            result = load()
            phases[phase] = time.perf_counter() - t
            return result

        def flow_model() -> torch.nn.Module:
            model = load_flow_model(load_config, options)
            if config.offload_flow and config.flow_fp8:  # loaded on the CPU, runs on flux_device
                match_device(model, torch.device(config.flux_device))
            return model

        if text_encoders_after_flow(load_config):
            # importing transformers (seconds of Python) runs while the flow checkpoint streams onto the GPU
            importing = threading.Thread(target=import_text_encoder_code, name="import-transformers", daemon=True)
            importing.start()

            def text_encoders() -> tuple[HFEmbedder, HFEmbedder]:
                importing.join()  # the wait counts as theirs: what the import cost beyond the overlap
                return load_text_encoders(load_config)

            model = timed("flow model", flow_model)
            ae = timed("autoencoder", lambda: load_autoencoder(load_config, options))
            clip, t5 = timed("text encoders", text_encoders)
        else:
            clip, t5 = timed("text encoders", lambda: load_text_encoders(load_config))
            model = timed("flow model", flow_model)
            ae = timed("autoencoder", lambda: load_autoencoder(load_config, options))
        logger.info(
            f"loaded {config.version} pipeline in {time.perf_counter() - start:.1f} s: "
            + ", ".join(f"{phase} {s:.1f} s" for phase, s in phases.items())
            + f" (flow model {config.flow_quantization_dtype or 'unquantized'} {config.flow_dtype}"
            + f" on {config.flux_device})"
        )
        pipeline = cls(config, model, ae, clip, t5, pin_lora_backups, checkpoint_source(load_config, model))
        if config.compiles:
            pipeline.compile(warm_up_sizes, warm_up_batch)
        return pipeline

    def compile(self, sizes: tuple[tuple[int, int], ...] = WARM_UP_SIZES, batch: int = 1) -> None:
        """Compile the flow model and warm it up: one step at the first size, two at the second, and so on. At
        two sizes the second compiles the dynamic-shape graph that later sizes reuse, so no request pays compile
        time; the step counts matter because the modulation table of a loop holds one row per step, and one row
        compiles apart from several (size-1 specialization). A one-image run warms up at its own size twice.
        `batch` > 1: a batch of two at the last size as well, which makes the batch dimension dynamic, so batches
        of any size up to it reuse the graph."""
        start = time.perf_counter()
        torch._logging.set_logs(recompiles=True)  # a recompile after warm-up shows in the log
        compile_flow_model(self.model, self.config.compile_blocks, self.config.compile_extras)
        if isinstance(self.step_model, GraphedFlow):
            self.step_model.reset()  # graphs captured before would replay the uncompiled kernels
        for steps, (width, height) in enumerate(sizes, start=1):
            self.generate_images("warm-up", width, height, num_steps=steps, seed=0)
        if batch > 1 and sizes:
            width, height = sizes[-1]
            self.generate_batch([ImageRequest("warm-up", seed=0), ImageRequest("warm-up", seed=1)], width, height, 2)
        logger.info(f"compiled and warmed up the flow model in {time.perf_counter() - start:.1f} s")

    @contextmanager
    def _on(self, module: torch.nn.Module, device: torch.device, offload: bool):
        """Run `module` on `device`; an offloaded module goes back to the CPU afterwards."""
        if not offload:
            yield
            return
        module.to(device)
        try:
            yield
        finally:
            module.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def default_steps(self) -> int:
        """Steps when a request names none: 4 for flux-schnell (distilled for them), 24 for flux-dev."""
        return DEFAULTS.schnell_steps if self.config.version == "flux-schnell" else DEFAULTS.num_steps

    # ---- inputs -------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, num_images: int, emphasis: bool | None = None) -> tuple[Tensor, Tensor]:
        """T5 tokens (B, L, context) and the CLIP vector (B, vec), on the flow device in the flow dtype. `emphasis`:
        whether `(word:1.5)` weights apply (None: the config's `prompt_emphasis`)."""
        emphasis = self.config.prompt_emphasis if emphasis is None else emphasis
        segments = parse_emphasis(prompt) if emphasis else None
        plain = "".join(text for text, _ in segments) if segments else prompt
        with self._on(self.t5, self.text_enc_device, self.config.offload_text_encoder):
            if segments:
                ids, weights, dropped = self.t5.tokenize_weighted(segments)
                txt = self.t5.apply_weights(self.t5(ids), weights)
            else:
                ids, (dropped,) = self.t5.tokenize([prompt])
                txt = self.t5(ids)
        self._warn_truncated("T5", dropped, self.t5.max_length)
        ids, (dropped,) = self.clip.tokenize([plain])  # CLIP's pooled vector takes no per-token weights
        with self._on(self.clip, self.text_enc_device, self.config.offload_text_encoder):
            vec = self.clip(ids)
        self._warn_truncated("CLIP", dropped, self.clip.max_length)
        dtype = self.config.flow_torch_dtype
        txt = txt.to(self.flux_device, dtype).expand(num_images, -1, -1)
        vec = vec.to(self.flux_device, dtype).expand(num_images, -1)
        return txt, vec

    @staticmethod
    def _warn_truncated(name: str, dropped: int, limit: int) -> None:
        if dropped:
            logger.warning(f"prompt truncated for {name}: {dropped} tokens past {limit} dropped")

    # ---- generation ---------------------------------------------------------------------------------------

    def generate_images(
        self,
        prompt: str,
        width: int = DEFAULTS.width,
        height: int = DEFAULTS.height,
        num_steps: int | None = None,
        guidance: float = DEFAULTS.guidance,
        seed: int | None = None,
        num_images: int = DEFAULTS.num_images,
        callback: StepCallback | None = None,
        cancel: threading.Event | None = None,
        init_image: Any = None,
        strength: float = DEFAULTS.strength,
        allow_image_path: bool = True,
        prompt_emphasis: bool | None = None,
        on_latents: Callable[[int, Tensor], None] | None = None,
    ) -> tuple[list[Image.Image], int]:
        """The lower-level call: PIL images and the seed. `num_steps` None: the version's default (`default_steps`;
        flux-schnell ignores `guidance`). `callback(step, total)` runs after every step; setting `cancel` stops
        between steps with `Cancelled`. With `init_image`, img2img: the image is encoded and noised to the
        timestep `strength` selects (1.0: pure noise, 0.0: no change). `prompt_emphasis`: see `encode_prompt`.
        `on_latents(step, latents)`: the packed latents after each step (for previews). Several requests of one
        size run together with `generate_batch`."""
        request = ImageRequest(prompt, guidance, seed, num_images, prompt_emphasis, callback, cancel, on_latents)
        (outcome,) = self.generate_batch(
            [request], width, height, num_steps, init_image, strength, allow_image_path
        )  # a batch of one raises what stopped it
        return outcome

    def encode_image(self, image: Image.Image, width: int, height: int) -> Tensor:
        """(1, 16, H/8, W/8) float32 latent of the image, cover-resized and centre-cropped to width x height."""
        x = to_tensor(cover_crop(image, width, height)).to(self.ae_device, self.ae.dtype)
        return self.ae.encode(x).float()

    @staticmethod
    def preview(latents: Tensor, height: int, width: int) -> Image.Image:
        """A rough look at packed latents, at 1/8 of the image's size: three of the 16 latent channels as RGB,
        each stretched to its range. Costs no autoencoder pass."""
        x = sampling.unpack(latents[:1].float(), height, width)[0, :3]
        low, high = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        pixels = ((x - low) / (high - low).clamp(min=1e-6) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(pixels)

    def decode(self, img: Tensor, height: int, width: int) -> list[Image.Image]:
        latents = sampling.unpack(img.float(), height, width).to(self.ae_device, self.ae.dtype)
        x = self.ae.decode(latents).float().clamp(-1, 1)
        pixels = (127.5 * (x + 1.0)).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return [Image.fromarray(p) for p in pixels]

    def generate(
        self,
        prompt: str,
        width: int = DEFAULTS.width,
        height: int = DEFAULTS.height,
        num_steps: int | None = None,
        guidance: float = DEFAULTS.guidance,
        seed: int | None = None,
        init_image: Any = None,
        strength: float = DEFAULTS.strength,
        silent: bool = False,
        num_images: int = DEFAULTS.num_images,
        return_seed: bool = False,
        jpeg_quality: int = DEFAULTS.jpeg_quality,
        prompt_emphasis: bool | None = None,
    ) -> io.BytesIO | list[io.BytesIO] | tuple[io.BytesIO | list[io.BytesIO], int]:
        """JPEG bytes of one image (a list when `num_images > 1`), and the seed with `return_seed`."""
        if not 1 <= jpeg_quality <= 100:
            raise InvalidInput(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
        num_steps = self.default_steps if num_steps is None else num_steps
        bar = None if silent else tqdm(total=num_steps, desc="denoising", unit="step")
        try:
            images, seed = self.generate_images(
                prompt,
                width,
                height,
                num_steps,
                guidance,
                seed,
                num_images,
                callback=None if bar is None else lambda step, total: bar.update(1),
                init_image=init_image,
                strength=strength,
                prompt_emphasis=prompt_emphasis,
            )
        finally:
            if bar is not None:
                bar.close()
        jpegs = [io.BytesIO(encode_image(image, "jpeg", jpeg_quality)) for image in images]
        result = jpegs[0] if num_images == 1 else jpegs
        return (result, seed) if return_seed else result


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off, then as it was: loading, compiling and warming up allocate millions of
    objects that mostly live on (imports, the model, compiled graphs), and the collector's passes over all of them
    cost seconds of a start (bench/RESULTS.md). The little garbage they leave is collected once it is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def compile_flow_model(model: torch.nn.Module, blocks: bool = True, extras: bool = True) -> torch.nn.Module:
    """`torch.compile` the flow model's blocks and/or the other submodules, in place (state-dict keys unchanged).

    Blocks of one kind share one compiled graph. The first call at a new image size recompiles once with
    dynamic shapes, after which new sizes reuse it.
    """
    if blocks:
        for block in [*model.double_blocks, *model.single_blocks]:
            block.compile()
    if extras:
        # the submodules that run at every step; the timestep, guidance and vector embedders and the rotary
        # embedding run once per image (`modulation_table`, `GraphedFlow`), where compiling them saves
        # microseconds and costs every start a trace of each warm-up shape (seconds; bench/RESULTS.md)
        for name in ("img_in", "txt_in", "final_layer"):
            getattr(model, name).compile()
    return model
