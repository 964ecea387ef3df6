"""schemathesis hooks for the fuzz test: *valid* generation requests run on the CPU, so keep them cheap. Where a case
leaves the image size or step count at the server's default (720x1024, 24 steps: absent, or given as that value
while the case varies another field), a small value is sent instead, so the varied field is still probed; valid
cases that still ask for expensive work are dropped (or, in a phase that skips the filters, sent at the small
size). Invalid values all go through, so every limit is probed. Validity is the server's own: its request schema.
A request's cost on the tiny model is its attention (quadratic in the image's tokens plus the 64 text tokens) and
its decode (linear in pixels), per step and image: both are held to what a 256x256 image at 4 steps costs."""

import schemathesis
from pydantic import ValidationError

from serving.schemas import GenerateRequest

DEFAULTS = {"width": 720, "height": 1024, "num_steps": 24}  # the server's
CHEAP = {"width": 128, "height": 128, "num_steps": 2}
TEXT_TOKENS = 64  # the tiny config's T5 length
BUDGET_PIXELS = 256 * 256 * 4
BUDGET_ATTENTION = (256 * 256 // 256 + TEXT_TOKENS) ** 2 * 4


def cheapened(body: dict) -> dict:
    out = dict(body)
    for key, default in DEFAULTS.items():
        if key not in out or (out[key] == default and not isinstance(out[key], bool)):
            out[key] = CHEAP[key]
    return out


def _too_expensive(body: dict) -> bool:
    """Whether the server would run this body (it validates) at a cost over the budget."""
    try:
        request = GenerateRequest.model_validate(body)
    except (ValidationError, ValueError, TypeError):
        return False  # refused before any work
    pixels, repeats = request.width * request.height, request.num_steps * request.num_images
    return pixels * repeats > BUDGET_PIXELS or (pixels / 256 + TEXT_TOKENS) ** 2 * repeats > BUDGET_ATTENTION


def _generate_body(body) -> bool:
    return isinstance(body, dict) and "prompt" in body


def affordable(body) -> bool:
    return not _generate_body(body) or not _too_expensive(cheapened(body))


def sent(body: dict) -> dict:
    """What is sent: `cheapened`, and a valid case still over budget at the small size, one image."""
    out = cheapened(body)
    if _too_expensive(out):
        out.update(CHEAP, num_images=1)
    return out


@schemathesis.hook
def filter_body(ctx, body) -> bool:
    return affordable(body)


@schemathesis.hook
def filter_case(ctx, case) -> bool:
    return affordable(case.body)


@schemathesis.hook
def before_call(ctx, case, **kwargs) -> None:
    if _generate_body(case.body):
        replacement = sent(case.body)
        case.body.clear()  # in place: the phases read the body they generated
        case.body.update(replacement)
