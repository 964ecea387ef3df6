"""The web UI at /ui (Gradio, an optional extra: `pip install flux-fp8-api[ui]`; the server's `--ui`).

Its generations go through the server's one worker queue, like `POST /generate`: never two GPU jobs at once, a
full queue is a message, and its cancel button stops its running job between steps. A LoRA picked from
`--lora-dir` applies to that image only (fused before it, unfused after, in the same job). With `--api-key`,
the UI asks for the key on a login page (any user name); browsers cannot send the API's bearer header.
"""

import os
import secrets
import threading
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import RedirectResponse
from loguru import logger

from errors import Cancelled, FluxError
from serving.lora import resolve_lora_path, use_loras
from serving.settings import ServerSettings
from serving.worker import QueueFull
from util import DEFAULTS, LIMITS

PATH = "/ui"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a server makes no calls home
NO_LORA = "(none)"


def lora_files(lora_dir: Path | None) -> list[str]:
    if lora_dir is None:
        return []
    return sorted(str(p.relative_to(lora_dir)) for p in lora_dir.rglob("*.safetensors") if p.is_file())[:500]


def generation_job(app: FastAPI, args: dict, lora: str | None, lora_scale: float, steps: dict):
    """The job the UI submits: the picked LoRA fused for this image only (unless it is loaded already), then the
    image. `steps` is updated after every step: the UI's progress."""
    pipeline = app.state.pipeline

    def callback(step: int, total: int) -> None:
        steps.update(step=step, total=total)

    def run(cancel: threading.Event):
        use_loras(app, None)  # the server's own set, should a request's LoRAs be in place
        name = None
        if lora is not None and all(entry["path"] != lora for entry in pipeline.list_loras()):
            name = pipeline.load_lora(lora, scale=lora_scale, name=f"ui:{Path(lora).name}")
        try:
            return pipeline.generate_images(**args, callback=callback, cancel=cancel, allow_image_path=False)
        finally:
            if name is not None:
                pipeline.unload_lora(name)

    return run


def build_ui(app: FastAPI):
    """The Gradio Blocks of the UI, bound to `app`'s pipeline and worker."""
    import gradio as gr  # optional, and seconds to import: only a server with --ui pays for it

    running: dict[str, threading.Event] = {}  # session -> its running job's cancel flag

    def generate(prompt, width, height, steps, guidance, seed, image, strength, lora, lora_scale, request: gr.Request,
                 progress=gr.Progress()):  # fmt: skip
        state = app.state
        if not state.ready:
            raise gr.Error("the server is starting or shutting down")
        lora_path = None
        if lora and lora != NO_LORA:
            try:
                lora_path = str(resolve_lora_path(state.lora_dir, lora))
            except HTTPException as e:
                raise gr.Error(f"LoRA {lora}: {e.detail}") from None
        seed = None if seed is None or int(seed) < 0 else int(seed)
        args = dict(
            prompt=prompt, width=int(width), height=int(height), num_steps=int(steps), guidance=float(guidance),
            seed=seed, init_image=image, strength=float(strength) if image is not None else 1.0,
        )  # fmt: skip
        progress_of = {"step": 0, "total": int(steps)}
        try:
            job = state.worker.submit(generation_job(app, args, lora_path, float(lora_scale), progress_of))
        except QueueFull:
            raise gr.Error("the queue is full; try again in a moment") from None
        running[request.session_hash] = job.cancel  # the cancel button's: dropped if queued, stopped if running
        try:
            while not job.future.done():
                progress((progress_of["step"], progress_of["total"]), desc="denoising", unit="steps")
                time.sleep(0.1)
            images, used_seed = job.future.result()
        except Cancelled:
            raise gr.Error("cancelled") from None
        except FluxError as e:
            raise gr.Error(str(e)) from None
        finally:
            running.pop(request.session_hash, None)
        logger.info(f"UI image: {width}x{height}, {steps} steps, seed {used_seed}")
        return images[0], str(used_seed)

    def cancel(request: gr.Request):
        event = running.get(request.session_hash)
        if event is not None:
            event.set()

    schnell = app.state.pipeline.config.version == "flux-schnell"
    with gr.Blocks(title="flux-fp8-api") as blocks:
        gr.Markdown("## flux-fp8-api")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=3, max_length=LIMITS.max_prompt_chars, elem_id="prompt")
                with gr.Row():
                    size = dict(minimum=LIMITS.min_size, maximum=LIMITS.max_size, step=LIMITS.size_multiple)
                    width = gr.Slider(label="Width", value=1024, **size, elem_id="width")
                    height = gr.Slider(label="Height", value=1024, **size, elem_id="height")
                with gr.Row():
                    steps = gr.Slider(
                        label="Steps", minimum=1, maximum=LIMITS.max_steps, step=1,
                        value=DEFAULTS.schnell_steps if schnell else 20, elem_id="steps",
                    )  # fmt: skip
                    guidance = gr.Slider(
                        label="Guidance" + (" (flux-schnell ignores it)" if schnell else ""),
                        minimum=0, maximum=LIMITS.max_guidance, step=0.1, value=DEFAULTS.guidance,
                    )  # fmt: skip
                seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="seed")
                with gr.Accordion("Image to image", open=False):
                    image = gr.Image(label="Start from", type="pil", sources=["upload", "clipboard"])
                    strength = gr.Slider(label="Strength", minimum=0, maximum=1, step=0.01, value=0.8)
                choices = [NO_LORA, *lora_files(app.state.lora_dir)]
                with gr.Row(visible=len(choices) > 1):
                    lora = gr.Dropdown(label="LoRA (this image only)", choices=choices, value=NO_LORA)
                    lora_scale = gr.Slider(label="LoRA scale", minimum=-2, maximum=2, step=0.05, value=1.0)
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                result = gr.Image(label="Image", type="pil", format="png", elem_id="result")
                used_seed = gr.Textbox(label="Seed used", interactive=False, elem_id="used-seed")
        inputs = [prompt, width, height, steps, guidance, seed, image, strength, lora, lora_scale]
        go.click(generate, inputs, [result, used_seed], concurrency_limit=None)
        prompt.submit(generate, inputs, [result, used_seed], concurrency_limit=None)
        stop.click(cancel, None, None, queue=False)
    return blocks


def mount(app: FastAPI, settings: ServerSettings) -> None:
    import gradio as gr  # see build_ui

    key = settings.api_key
    auth = (lambda _user, password: secrets.compare_digest(password.encode(), key.encode())) if key else None
    gr.mount_gradio_app(app, build_ui(app), path=PATH, auth=auth)
    if settings.ui_at_root:
        app.add_api_route("/", lambda: RedirectResponse(f"{PATH}/"), include_in_schema=False)
    logger.info(f"web UI at {PATH}" + (" (login with the API key)" if key else ""))
