"""JSON request bodies read and parsed with every hold of the interpreter lock short.

The event loop shares the lock with the threads that parse: one C call over a 30 MB body (a copy, a scan,
`json.loads`, a base64 decode) holds it for 30-100 ms, and `/health` waits that long. So a body is read into one
preallocated buffer, its structure found with memchr-speed scans, and a large `init_image` string is cut out of the JSON
before `json.loads` sees it, to be decoded in small chunks (`images.decode_base64_image`). What is left for
`json.loads` is bounded in size and in the number of values, so no body can make the parser itself slow.
"""

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

SMALL = 64 * 1024  # parsed as it is: json.loads of this much takes a few ms at worst
BIG_STRING = 64 * 1024  # a string literal this long can only be init_image's value
MAX_REST = 1024 * 1024  # the JSON left once init_image's value is cut out
MAX_STRUCTURE = 25_000  # quotes, commas, colons, brackets: a request has ~50, plus a 10,000-character prompt's
_ESCAPES = {b"\\n": b"\n", b"\\r": b"\r", b"\\t": b"\t", b"\\/": b"/"}  # all that wrapped base64 holds
CHUNK = 1024 * 1024


def invalid(msg: str, kind: str = "body_invalid", loc: tuple = ("body",)) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


async def read_body(request: Request) -> bytearray:
    """The whole body in one buffer grown chunk by chunk: each step is a small copy (large buffers grow by remapping
    pages, not copying), where joining the chunks, or zeroing a buffer of the declared size, would hold the event
    loop for tens of ms. Its size and arrival time are bounded by `serving.body_limit`."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def parse_json(raw: bytearray) -> tuple[Any, memoryview | None]:
    """(document, init_image): the parsed body and, when the body holds a string longer than `BIG_STRING`, that
    string's bytes (the escapes of wrapped base64 undone), cut out of the document (its value there is ""). Invalid,
    oversized or overcomplicated bodies raise the 422 the routes give for invalid input."""
    if len(raw) <= SMALL:
        return _loads(raw), None
    quotes = [q for q in _structure(raw) if raw[q] == 0x22 and not _escaped(raw, q)]
    strings = [(a + 1, b) for a, b in zip(quotes[::2], quotes[1::2], strict=False) if b - a > BIG_STRING]
    if not strings:
        if len(raw) > MAX_REST:
            raise invalid(f"body over {MAX_REST} bytes without an init_image", "too_long")
        return _loads(raw), None
    start, end = strings[0]
    before = quotes.index(start - 1)
    key = bytes(raw[quotes[before - 2] + 1 : quotes[before - 1]]) if before >= 2 else b""
    between = bytes(raw[quotes[before - 1] + 1 : start - 1]).strip() if before >= 2 else b""
    if len(strings) > 1 or key != b"init_image" or between != b":":
        raise invalid(f"only init_image may be longer than {BIG_STRING} bytes", "too_long")
    rest = bytes(raw[:start]) + bytes(raw[end:])
    if len(rest) > MAX_REST:
        raise invalid(f"body over {MAX_REST} bytes besides its init_image", "too_long")
    document = _loads(rest)
    if not isinstance(document, dict) or document.get("init_image") != "":
        raise invalid("init_image must be a top-level field", loc=("body", "init_image"))
    return document, _unescape(raw, start, end)


def _structure(raw: bytearray) -> list[int]:
    """Where the quotes, commas, colons and brackets are, in order. A `find` is a memchr: ~2 ms over 30 MB of base64
    for each character, and never more than `MAX_STRUCTURE` of them."""
    marks = []
    for char in b'",:[{':
        at = raw.find(char)
        while at >= 0:
            marks.append(at)
            if len(marks) > MAX_STRUCTURE:
                raise invalid(f"body has more than {MAX_STRUCTURE} fields, values and separators", "too_complex")
            at = raw.find(char, at + 1)
    return sorted(marks)


def _unescape(raw: bytearray, start: int, end: int) -> bytes | memoryview:
    """The JSON string literal raw[start:end] with the escapes a wrapped base64 string holds undone, chunk by chunk.
    Any other escape cannot be part of base64: it is left for the base64 decoder to refuse."""
    if raw.find(b"\\", start, end) < 0:
        return memoryview(raw)[start:end]
    out, carry = bytearray(), b""
    for i in range(start, end, CHUNK):
        piece = carry + bytes(raw[i : min(i + CHUNK, end)])
        cut = len(piece) - (len(piece) - len(piece.rstrip(b"\\"))) % 2  # an escape split by the chunk waits
        piece, carry = piece[:cut], piece[cut:]
        for escape, replacement in _ESCAPES.items():
            piece = piece.replace(escape, replacement)
        out += piece
    return bytes(out + carry)


def _escaped(raw: bytearray, quote: int) -> bool:
    """Whether the quote at `quote` is escaped: an odd run of backslashes before it. Read back 256 bytes at a time,
    so the runs before all quotes together cost one pass over the body at most."""
    run, end = 0, quote
    while end > 0:
        window = bytes(raw[max(end - 256, 0) : end])
        tail = len(window) - len(window.rstrip(b"\\"))
        run += tail
        if tail < len(window):
            break
        end -= len(window)
    return run % 2 == 1


def _loads(raw: bytes | bytearray) -> Any:
    try:
        return json.loads(raw or b"null")
    except RecursionError:
        raise invalid("body is nested too deeply", "too_deep") from None
    except ValueError as e:
        raise invalid(f"invalid JSON: {e}", "json_invalid") from None
