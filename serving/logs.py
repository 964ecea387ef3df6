"""One log format for the whole server: loguru, with the standard `logging` of uvicorn, transformers and the rest
routed into it, the request (or job) id on every line of a request's work, and `--log-json` for one JSON object a
line. The id travels in a context variable: set for each request by `request_context`, and carried into the
worker thread with the job (`serving.worker`), so the pipeline's own lines carry it too."""

import contextvars
import logging
import os
import sys

from loguru import logger

QUIET_LOADING = "FLUX_QUIET_LOADING"
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {extra[request_id]} | {name}:{function} - {message}"


class ToLoguru(logging.Handler):
    """A `logging` handler that hands each record to loguru, at its level, from its caller."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def with_request_id(record) -> None:
    record["extra"].setdefault("request_id", REQUEST_ID.get())


def configure(json_lines: bool = False, level: str = "INFO") -> None:
    """Route every log line of the process through loguru, in one format. Call once, before loading."""
    os.environ[QUIET_LOADING] = "1"  # transformers' per-layer load bars: noise in a server log (util reads it)
    logger.remove()
    logger.configure(patcher=with_request_id)
    if json_lines:
        logger.add(sys.stderr, level=level, serialize=True)
    else:
        logger.add(sys.stderr, level=level, format=TEXT_FORMAT)
    logging.basicConfig(handlers=[ToLoguru()], level=logging.INFO, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "transformers", "torch", "httpx"):
        named = logging.getLogger(name)
        named.handlers, named.propagate = [], True
