"""What the server is started with, apart from the model's config."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    max_queue_size: int = 8  # jobs waiting at most; one more gets 429
    api_key: str | None = None  # `Authorization: Bearer KEY` on every route but /health
    lora_dir: str | None = None  # POST /lora loads files from here only; None: LoRA loading off
    public_docs: bool = False  # /docs and /openapi.json open even with an API key
    ui: bool = False  # the Gradio web UI at /ui (needs the `ui` extra)
    ui_at_root: bool = False  # `/` redirects to the UI (main_gr.py)
    metadata: bool = True  # generation parameters written into the image files
    public_metrics: bool = False  # /metrics open even with an API key
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    max_batch: int = 4  # images of waiting requests run as one batch at most (1: no batching)
    batch_max_pixels: int = 768 * 768  # only sizes up to this batch (larger ones fill the GPU alone)
