"""Command line: build a FluxPipeline from a config file and/or flags, then serve it (or make one image)."""

import argparse
import gc
import importlib.util
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from loguru import logger

from cache_dir import use_cache_dir
from errors import FluxError
from serving import logs
from serving.settings import ServerSettings

# The library (and torch with it) is imported in `build_pipeline`, after `--cache-dir` has pointed the compile
# and bytecode caches at their folder: imported first, torch would have read the variables already.

MAX_CONNECTIONS = 64
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
QUANT_CHOICES = {
    "qfloat8": "qfloat8",
    "quanto_qfloat8": "quanto_qfloat8",
    "qint2": "qint2",
    "qint4": "qint4",
    "qint8": "qint8",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")  # one line, not the whole usage


def ranged(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    S = argparse.SUPPRESS  # flags not given stay absent, so a config file's values stand
    p = Parser(description="flux-fp8-api: FLUX.1 image generation server")
    p.add_argument("--config-path", "-c", help="JSON config (flags given with it override its keys)")
    p.add_argument("--port", "-p", type=ranged(1, 65535), default=8088)
    p.add_argument("--host", "-H", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    p.add_argument("--flow-model-path", "-f", dest="ckpt_path", default=S)
    p.add_argument("--text-enc-path", "-t", dest="text_enc_path", default=S)
    p.add_argument("--autoencoder-path", "-a", dest="ae_path", default=S)
    p.add_argument("--model-version", "-m", dest="version", choices=["flux-dev", "flux-schnell"], default=S)
    p.add_argument("--flux-device", "-F", dest="flux_device", default=S)
    p.add_argument("--text-enc-device", "-T", dest="text_enc_device", default=S)
    p.add_argument("--autoencoder-device", "-A", dest="ae_device", default=S)
    p.add_argument("--num-to-quant", "-q", type=int, default=S, help="ignored (kept for old scripts)")
    p.add_argument("--compile", "-C", action="store_true", default=S, help="compile blocks and extras at load")
    p.add_argument(
        "--quant-text-enc", "-qT", choices=sorted(QUANT_CHOICES), default=S, help="T5 quantization (bf16: none)"
    )
    p.add_argument("--quant-ae", "-qA", action="store_true", default=S, help="fp8 autoencoder weights")
    p.add_argument("--offload-flow", "-OF", action="store_true", default=S)
    p.add_argument("--no-offload-ae", "-OA", action="store_true", default=S)
    p.add_argument("--no-offload-text-enc", "-OT", action="store_true", default=S)
    p.add_argument("--prequantized-flow", "-PF", action="store_true", default=S)
    p.add_argument("--no-quantize-flow-modulation", "-nqfm", action="store_true", default=S)
    p.add_argument("--quantize-flow-embedder-layers", "-qfl", action="store_true", default=S)
    p.add_argument("--lora-dir", help="directory that POST /lora may load LoRA files from")
    p.add_argument(
        "--max-queue-size",
        type=ranged(1, 10_000),
        default=ServerSettings.max_queue_size,
        help="generation requests waiting at most",
    )
    p.add_argument(
        "--max-batch",
        type=ranged(1, 64),
        default=ServerSettings.max_batch,
        help="images of waiting requests (same size, steps and LoRAs) run as one batch at most; 1: no batching",
    )
    p.add_argument(
        "--batch-max-pixels",
        type=ranged(0, 16384 * 16384),
        default=ServerSettings.batch_max_pixels,
        help="only requests of at most this many pixels (width x height) are batched",
    )
    p.add_argument(
        "--max-connections",
        type=ranged(1, 100_000),
        default=MAX_CONNECTIONS,
        help="open connections at most; beyond them new requests are answered 503",
    )
    p.add_argument("--public-docs", action="store_true", help="/docs and /openapi.json open even with --api-key")
    p.add_argument("--ui", action="store_true", help="serve the web UI at /ui (needs gradio: the `ui` extra)")
    p.add_argument("--ui-at-root", action="store_true", help=argparse.SUPPRESS)  # main_gr.py: / leads to /ui
    p.add_argument("--no-metadata", action="store_true", help="no generation parameters in the image files")
    p.add_argument("--public-metrics", action="store_true", help="/metrics open even with --api-key")
    p.add_argument(
        "--cors-origin", action="append", default=[], help="a browser origin allowed to call the API (repeatable)"
    )
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--api-key", default=os.environ.get("FLUX_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("FLUX_CACHE_DIR"),
        help="keep every start-up cache here (compiled graphs, Triton kernels, built extensions, Python bytecode)",
    )
    p.add_argument(
        "--write-compile-cache",
        nargs="?",
        const="",
        metavar="FILE",
        help="compile and warm up as a server would, write the compile-cache artifact (default: next to the flow "
        "checkpoint, which later starts load), and exit",
    )
    one = p.add_argument_group("one image instead of a server")
    one.add_argument("--prompt", help="generate this prompt, write --output, and exit")
    one.add_argument("--output", "-o", default="output.jpg")
    one.add_argument("--width", type=int, default=None, help="default 720")
    one.add_argument("--height", type=int, default=None, help="default 1024")
    one.add_argument("--num-steps", type=int, default=None, help="default 24 (flux-schnell: 4)")
    one.add_argument("--guidance", type=float, default=None, help="default 3.5")
    one.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


def config_overrides(args: argparse.Namespace) -> dict:
    """Config keys from the flags that were given."""
    given = vars(args)
    out = {
        k: given[k]
        for k in ("ckpt_path", "text_enc_path", "ae_path", "version", "flux_device", "text_enc_device", "ae_device")
        if k in given
    }
    if "num_to_quant" in given:
        logger.warning("--num-to-quant is ignored: which layers are fp8 is fixed (see README)")
    if "compile" in given:
        out["compile_blocks"] = out["compile_extras"] = True
    if "quant_text_enc" in given:
        out["text_enc_quantization_dtype"] = QUANT_CHOICES[given["quant_text_enc"]]
    if "quant_ae" in given:
        out["ae_quantization_dtype"] = "qfloat8"
    flags = {
        "offload_flow": ("offload_flow", True),
        "no_offload_ae": ("offload_vae", False),
        "no_offload_text_enc": ("offload_text_encoder", False),
        "prequantized_flow": ("prequantized_flow", True),
        "no_quantize_flow_modulation": ("quantize_modulation", False),
        "quantize_flow_embedder_layers": ("quantize_flow_embedder_layers", True),
    }
    out.update(value for flag, value in flags.items() if flag in given)
    return out


def build_pipeline(args: argparse.Namespace):
    start = time.perf_counter()
    from flux_pipeline import WARM_UP_SIZES, FluxPipeline  # after use_cache_dir: see the note at the top
    from util import DEFAULT_CONFIGS, load_config

    logger.info(f"imported the pipeline's code in {time.perf_counter() - start:.1f} s")
    overrides = config_overrides(args)
    if args.config_path:
        config = load_config(args.config_path, **overrides)
    else:
        missing = [
            flag
            for flag, key in (("--flow-model-path", "ckpt_path"), ("--autoencoder-path", "ae_path"))
            if key not in overrides
        ]
        if missing:
            raise SystemExit(f"error: without --config-path, give {' and '.join(missing)}")
        config = load_config(str(DEFAULT_CONFIGS[overrides.get("version", "flux-dev")]), **flags_only(overrides))
    # a server warms up at the sizes requests use, and for the batches it will run; compile happens at load, never
    # in a request, a one-image run's image included: it warms up at its own size only (one step, then two), or,
    # when a compile-cache artifact holds the server's sizes, at those (found, not compiled), which its size reuses
    sizes, batch = WARM_UP_SIZES, args.max_batch
    if args.prompt is not None:
        batch = 1
        if not has_compile_cache(config):
            sizes = ((args.width, args.height),) * 2
    load = dict(warm_up_sizes=sizes, warm_up_batch=batch)
    if args.write_compile_cache is not None:  # compiled afresh: an artifact lists what this process compiled
        if not config.compiles:
            raise SystemExit("error: --write-compile-cache needs a config that compiles (compile_blocks, or --compile)")
        load["use_compile_cache"] = False
    return FluxPipeline.load_pipeline_from_config(config, **load)


def has_compile_cache(config) -> bool:
    from util import compile_artifact

    artifact = compile_artifact(config) if config.compiles else None
    return artifact is not None and artifact.is_file()


def flags_only(overrides: dict) -> dict:
    """The config keys of a launch without --config-path, as the original's: compiled only with --compile, the
    text encoders and the autoencoder offloaded unless --no-offload-text-enc / --no-offload-ae (what lets 16-24 GB
    cards run it)."""
    launch = {"compile_blocks": False, "compile_extras": False, "offload_text_encoder": True, "offload_vae": True}
    return {**launch, **overrides}


def main(argv: list[str] | None = None) -> None:
    # a start allocates millions of objects that live as long as the process (modules, the model, compiled graphs),
    # and the cyclic collector's passes over them cost seconds of it (bench/RESULTS.md): off until a server is
    # warmed up (`serve` collects once and turns it back on); a one-image run ends before it would matter
    gc.disable()
    args = parse_args(argv)
    if args.prompt is None:
        logs.configure(json_lines=args.log_json)
    if args.cache_dir:
        use_cache_dir(args.cache_dir)
    listener = None
    if args.prompt is None and args.write_compile_cache is None:  # a server's mistakes, found before loading
        if args.lora_dir and not Path(args.lora_dir).is_dir():
            raise SystemExit(f"error: --lora-dir {args.lora_dir} is not a directory")
        if args.ui and importlib.util.find_spec("gradio") is None:
            raise SystemExit("error: --ui needs gradio: pip install 'flux-fp8-api[ui]'")
        listener = listen(args.host, args.port)
    from util import DEFAULTS  # after use_cache_dir: see the note at the top

    for key in ("width", "height", "guidance"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(DEFAULTS, key))
    try:
        pipeline = build_pipeline(args)
    except FluxError as e:
        raise SystemExit(f"error: {e}") from None
    if args.write_compile_cache is not None:
        return write_compile_cache(pipeline, args.write_compile_cache)
    if args.prompt is not None:
        jpeg, seed = pipeline.generate(
            args.prompt, args.width, args.height, args.num_steps, args.guidance, args.seed, return_seed=True
        )
        Path(args.output).write_bytes(jpeg.getvalue())
        logger.info(f"wrote {args.output} (seed {seed})")
        return
    serve(pipeline, args, listener)


def write_compile_cache(pipeline, path: str) -> None:
    import compile_cache
    from util import compile_artifact, flow_checkpoint

    config = pipeline.config  # loading compiled and warmed up as a server's start does
    # where this config's starts look for it ("off" in the config: beside the checkpoint all the same)
    compile_cache.save(path or compile_artifact(config) or compile_cache.default_path(flow_checkpoint(config)))


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a busy port or a wrong address is one line before anything loads."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # the protocol named (IPPROTO_TCP, not 0): asyncio turns Nagle off only on sockets that say they are TCP,
        # and with it on, every answer on a kept-alive connection waits 40 ms for the client's delayed ACK
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(pipeline, args: argparse.Namespace, listener: socket.socket) -> None:
    """Warm up, then serve `pipeline` on `listener` until SIGTERM/SIGINT."""
    from api import create_app
    from serving.connections import HeaderDeadlineProtocol

    if not pipeline.config.compiles:  # compiling warmed it up already, at the sizes that matter
        start = time.perf_counter()
        pipeline.generate_images("warm-up", 256, 256, 1, seed=0)  # first-call costs (kernels, allocator) paid here
        logger.info(f"warmed up in {time.perf_counter() - start:.1f} s")
    if args.lora_dir:  # LoRA requests will come: pay for the pristine weight copies now, not on the first one
        pipeline.prepare_loras()
    # the start's garbage collected once; what loading made lives as long as the process: out of the collector's
    # sight, a full collection no longer walks the model's millions of objects, and no request waits for one
    start = time.perf_counter()
    collected = gc.collect()
    gc.freeze()
    gc.enable()
    logger.info(f"collected the start's garbage ({collected} objects) in {time.perf_counter() - start:.2f} s")
    settings = ServerSettings(
        args.max_queue_size, args.api_key, args.lora_dir, args.public_docs, args.ui, args.ui_at_root,
        metadata=not args.no_metadata, public_metrics=args.public_metrics, cors_origins=tuple(args.cors_origin),
        max_batch=args.max_batch, batch_max_pixels=args.batch_max_pixels,
    )  # fmt: skip
    app = create_app(pipeline, settings)
    config = uvicorn.Config(
        app,
        log_config=None,  # uvicorn's lines go through `serving.logs`, in the server's one format
        log_level="info",
        http=HeaderDeadlineProtocol,  # h11, whose connections can be given a deadline for their headers
        limit_concurrency=args.max_connections,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    logger.info(f"serving on http://{args.host}:{args.port}" + (" (API key required)" if args.api_key else ""))
    DrainingServer(config).run(sockets=[listener])


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains: health and new requests answer 503 on open sockets, queued jobs fail, and
    once the running job is done uvicorn closes the connections and the process exits 0. A second one stops the
    running job between steps and exits at once."""

    draining = False

    def handle_exit(self, sig, frame) -> None:
        state = self.config.app.state
        if not self.draining:
            self.draining = True
            state.drain()
            threading.Thread(target=self._exit_when_idle, args=(sig, frame), daemon=True).start()
            return
        if state.worker.cancel_running():
            logger.info("second signal: the running job is cancelled")
        self._exit(sig, frame)

    def _exit_when_idle(self, sig, frame) -> None:
        while self.config.app.state.worker.running:
            time.sleep(0.05)
        self._exit(sig, frame)

    def _exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:  # a drained SIGTERM is a clean exit (0); uvicorn would re-raise it
            captured = getattr(self, "_captured_signals", [])
            captured[:] = [s for s in captured if s != signal.SIGTERM]


def run() -> None:
    """The console script's entry (`flux-fp8-api`): `main`, then a quick exit once its output is written."""
    main()
    # done, output written and logged: skip the interpreter's teardown, which waits for torch.compile's worker
    # processes to stop (seconds of a one-image run; bench/RESULTS.md)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run()
