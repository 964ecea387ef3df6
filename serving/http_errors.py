"""The JSON error shape `{"error": {"message", "type"}}` for every failure, and the handlers that map the
library's exceptions (by type) and HTTP errors to it. No stack trace reaches a client."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from errors import Cancelled, InvalidInput, LoraError, LoraNotLoaded

RETRY_AFTER_S = "10"
KINDS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    422: "invalid_request",
    429: "queue_full",
    503: "unavailable",
}


def error(status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind or KINDS.get(status, "error")}}
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{loc}: {err['msg']}")
        return error(422, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(InvalidInput)
    async def _input(request: Request, exc: InvalidInput) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(LoraError)
    async def _lora(request: Request, exc: LoraError) -> JSONResponse:
        lora_dir = request.app.state.lora_dir
        message = f"not a usable LoRA: {exc}"
        return error(400, message.replace(str(lora_dir), "<lora-dir>") if lora_dir else message)

    @app.exception_handler(LoraNotLoaded)
    async def _not_loaded(request: Request, exc: LoraNotLoaded) -> JSONResponse:
        return error(404, "that LoRA is not loaded")

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        return error(503, str(exc), headers={"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error(f"{request.method} {request.url.path} failed")
        return error(500, "internal error", "internal_error")
