"""schemathesis hooks for the fuzz test: keep *valid* generation requests cheap on the CPU (small images, few
steps); invalid values pass through untouched, so every limit is still probed."""

import schemathesis


def _cap(body: dict, key: str, valid, cheap) -> None:
    value = body.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and valid(value):
        body[key] = cheap(value)


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        _cap(body, "width", lambda v: 128 <= v <= 2048 and v % 16 == 0, lambda v: min(v, 256))
        _cap(body, "height", lambda v: 128 <= v <= 2048 and v % 16 == 0, lambda v: min(v, 256))
        _cap(body, "num_steps", lambda v: 1 <= v <= 100, lambda v: min(v, 2))
    return body
