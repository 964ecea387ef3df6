"""The web UI on its own, as the original's `main_gr.py` started it: `python main_gr.py --config CONFIG [--port
7860] [--host 127.0.0.1]`. It is the server with `--ui` (its queue, its API beside the UI), opened at `/`.
`--share` (a public gradio.live link) is not offered: the server stays on the addresses it is bound to."""

import argparse
import sys

import main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description="flux-fp8-api web UI")
    p.add_argument("--config", default="configs/config-dev-1-H100.json", help="JSON config (default: %(default)s)")
    p.add_argument("--port", default="7860")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--share", action="store_true", help="not supported: refused with a message")
    return p.parse_known_args(argv)


def run(argv: list[str] | None = None) -> None:
    args, rest = parse_args(argv)
    if args.share:
        raise SystemExit("error: --share is not supported; bind --host 0.0.0.0 (behind a proxy) to reach it remotely")
    main.main(["--config-path", args.config, "--port", args.port, "--host", args.host, "--ui", "--ui-at-root", *rest])


if __name__ == "__main__":
    run(sys.argv[1:])
