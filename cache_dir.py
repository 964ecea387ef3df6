"""`--cache-dir`: one folder for everything that makes a start-up warm (compiled graphs, Triton kernels and their
autotune choices, built extensions, Python bytecode). Imports nothing heavy: it runs before torch is imported, since
torch reads the cache variables once, at import."""

import os
import sys
from importlib import _bootstrap_external
from pathlib import Path

from loguru import logger

# what the folder keeps besides Python's bytecode: environment variable -> its folder there
COMPILE_CACHES = {
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",
}


def use_cache_dir(path: str) -> None:
    """Keep what makes a start-up warm under `path`: inductor's compiled graphs, Triton's kernels and autotune
    choices, built torch extensions (optimum-quanto's CUDA one), and the bytecode of every module Python imports that
    the installation ships none for. That bytecode goes there even under PYTHONDONTWRITEBYTECODE (it never lands
    beside the installed sources): an installation without .pyc files, as in images built with that variable set,
    otherwise compiles some 4,000 modules from source at every start (seconds of every start; bench/RESULTS.md).
    Bytecode an installation ships is used where it is (`installed_bytecode_first`): an empty folder does not mean
    compiling it all again. Runs before torch is imported; the compile workers inherit it through the environment."""
    root = Path(path).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --cache-dir {path}: {e}") from None
    for var, sub in {**COMPILE_CACHES, "PYTHONPYCACHEPREFIX": "pycache"}.items():
        os.environ[var] = str(root / sub)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]
    sys.dont_write_bytecode = False
    installed_bytecode_first()
    if "torch" in sys.modules:  # imported already (in-process callers): later imports still use the folders
        logger.warning("--cache-dir given after torch was imported: modules imported so far were not cached")
    logger.info(f"start-up caches in {root}")


def installed_bytecode_first() -> None:
    """Make imports use a module's bytecode beside its source (`__pycache__/`, what pip writes at install) where
    there is one, and `sys.pycache_prefix` for the others. Python's import reads one place only, the prefix when
    it is set, which would compile every installed module again into an empty cache folder (transformers alone:
    seconds of a cold start). Python's source loader finds bytecode through `cache_from_source` in its bootstrap
    module; that one name is wrapped. A stale installed .pyc is recompiled and rewritten where it is, as Python
    does without a prefix. Where the bootstrap module lacks the name (another Python), the prefix alone applies."""
    original = getattr(_bootstrap_external, "cache_from_source", None)
    if original is None or getattr(original, "installed_first", False):
        return

    def cache_from_source(path, debug_override=None, *, optimization=None):
        cached = original(path, debug_override, optimization=optimization)
        beside = os.path.join(os.path.dirname(path), "__pycache__", os.path.basename(cached))
        return beside if beside != cached and os.path.isfile(beside) else cached

    cache_from_source.installed_first = True
    _bootstrap_external.cache_from_source = cache_from_source
