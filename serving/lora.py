"""POST /lora (load, rescale, unload) and GET /lora, confined to the server's LoRA directory."""

import re
import threading
from pathlib import Path, PurePath

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from errors import LoraNotLoaded
from serving.http_errors import RESPONSES
from serving.jobs import run_job
from serving.schemas import LoraRequest, documented, parse

router = APIRouter(responses=RESPONSES)


def resolve_lora_path(lora_dir: Path, requested: str) -> Path:
    """A path inside `lora_dir`, symlinks resolved before the containment check; HTTPException otherwise."""
    pure = PurePath(requested)
    if (
        "\x00" in requested
        or pure.is_absolute()
        or requested.startswith(("\\", "/"))
        or re.match(r"^[A-Za-z]:", requested)
    ):
        raise HTTPException(400, "path must be relative to the LoRA directory")
    if ".." in pure.parts or ".." in requested.replace("\\", "/").split("/"):
        raise HTTPException(400, "path may not contain '..'")
    if pure.suffix != ".safetensors":
        raise HTTPException(400, "only .safetensors LoRA files are accepted")
    root = lora_dir.resolve()
    try:
        full = (root / pure).resolve()
        inside, exists = full.is_relative_to(root), full.is_file()
    except (OSError, RuntimeError):  # a name too long for the file system, a symlink loop
        raise HTTPException(400, "path cannot be resolved") from None
    if not inside:
        raise HTTPException(403, "path leads outside the LoRA directory")
    if not exists:
        raise HTTPException(404, "no such LoRA file")
    return full


def shown_path(lora_dir: Path | None, path: str | None) -> str | None:
    """A loaded LoRA's path as clients see it: relative to the LoRA directory, never the server's own path."""
    if path is None or lora_dir is None:
        return None
    p = Path(path)
    return str(p.relative_to(lora_dir)) if p.is_relative_to(lora_dir) else p.name


@router.get("/lora")
async def list_loras(request: Request) -> JSONResponse:
    lora_dir = request.app.state.lora_dir
    loras = [dict(lora, path=shown_path(lora_dir, lora["path"])) for lora in request.app.state.pipeline.list_loras()]
    return JSONResponse({"loras": loras})


@router.post("/lora", openapi_extra=documented(LoraRequest))
async def lora(request: Request) -> JSONResponse:
    body = await parse(request, LoraRequest)
    lora_dir: Path | None = request.app.state.lora_dir
    pipeline = request.app.state.pipeline
    if lora_dir is None:
        raise HTTPException(403, "LoRA loading is disabled: start the server with --lora-dir")
    app = request.app
    if body.action == "load":
        full = resolve_lora_path(lora_dir, body.path)

        def load(cancel: threading.Event) -> str:
            use_loras(app, None)  # the server's own set, should a request's LoRAs be in place
            name = pipeline.load_lora(full, scale=body.scale, name=body.name)
            app.state.base_loras = current_loras(pipeline)
            return name

        name = await run_job(load, request)
        ignored = pipeline.loras.loaded[name].ignored  # keys the file holds that were not applied: never silent
        # "status": "success" is what the original's clients check
        answer = {"status": "success", "action": "loaded", "name": name, "scale": body.scale}
        return JSONResponse({**answer, "ignored_keys": ignored[:50], "ignored_count": len(ignored)})

    if body.name is not None:  # by name only: a server path given as a name must not find its LoRA
        key = body.name
        if key not in app.state.base_loras:
            raise LoraNotLoaded(key)
    else:
        key = str(resolve_lora_path(lora_dir, body.path))

    def unload(cancel: threading.Event) -> None:
        use_loras(app, None)
        pipeline.unload_lora(key)
        app.state.base_loras = current_loras(pipeline)

    await run_job(unload, request)
    return JSONResponse({"status": "success", "action": "unloaded", "name": body.name or shown_path(lora_dir, key)})


Wanted = dict[str, tuple[str, float]]  # LoRA name -> (file path, scale)


def current_loras(pipeline) -> Wanted:
    return {lora["name"]: (lora["path"], lora["scale"]) for lora in pipeline.list_loras()}


def resolve_request_loras(app, choices) -> Wanted | None:
    """A request's `loras` as files inside the LoRA directory (HTTP errors for bad ones, before any work is
    queued); None when the request names none, to run with the server's own set."""
    if choices is None:
        return None
    lora_dir = app.state.lora_dir
    if choices and lora_dir is None:
        raise HTTPException(403, "LoRA loading is disabled: start the server with --lora-dir")
    wanted: Wanted = {}
    for choice in choices:
        if choice.path is not None:
            full = resolve_lora_path(lora_dir, choice.path)
            name = full.stem
        elif choice.name in app.state.base_loras:
            name, full = choice.name, app.state.base_loras[choice.name][0]
        else:
            name, full = choice.name, resolve_lora_path(lora_dir, f"{choice.name}.safetensors")
        wanted[name] = (str(full), choice.scale)
    return wanted


def use_loras(app, wanted: Wanted | None) -> int:
    """On the worker, before a job: make the fused LoRAs `wanted` (None: the server's own set), changing only what
    differs, so that consecutive jobs wanting the same set pay nothing. Returns the loads and unloads made."""
    pipeline = app.state.pipeline
    wanted = app.state.base_loras if wanted is None else wanted
    return pipeline.set_loras(wanted)  # one pass over the touched layers, however many LoRAs change; 0 if none
