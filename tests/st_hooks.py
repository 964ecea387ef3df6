"""schemathesis hooks for the fuzz test: *valid* generation requests run on the CPU, so drop the expensive
ones (big images, many steps); invalid values still go through, so every limit is probed."""

import schemathesis

DEFAULTS = {"width": 720, "height": 1024, "num_steps": 24, "num_images": 1}


def _number(body: dict, key: str) -> float:
    value = body.get(key, DEFAULTS[key])
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


@schemathesis.hook
def filter_body(ctx, body) -> bool:
    if not isinstance(body, dict):
        return True
    work = _number(body, "width") * _number(body, "height") * _number(body, "num_steps") * _number(body, "num_images")
    return work <= 256 * 256 * 4
