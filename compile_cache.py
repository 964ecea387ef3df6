"""A portable compile-cache artifact: what compiling and warming up the flow model produced, in one file that a fresh
machine (same GPU model, same torch and Triton) loads at start instead of compiling.

The file is a zip of torch's own portable cache (`torch.compiler.save_cache_artifacts`: inductor's graphs and the
kernels they launch, AOT autograd entries, autotune choices) and the Triton cache entries of our own kernels
(`kernels/`, compiled by Triton's JIT outside inductor, which torch's artifact does not hold). It is written by
`main.py -c CONFIG --write-compile-cache` next to the flow checkpoint (`<checkpoint>.compile-cache`) and read at
load when present (config key `compile_cache` names another place, or "off").

An artifact holds compiled code that the process runs: trust one as you trust the installation, and load only
artifacts you (or your deployment) wrote.
"""

import contextlib
import hashlib
import io
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from loguru import logger

SUFFIX = ".compile-cache"
TORCH_ENTRY = "torch-cache-artifacts.bin"
TRITON_PREFIX = "triton/"


OFF = "off"


def default_path(checkpoint: str) -> Path:
    return Path(str(checkpoint) + SUFFIX)


def artifact_path(configured: str | None, checkpoint: Callable[[], str]) -> Path | None:
    """The artifact a config names (`compile_cache`): its path, None for "off", else beside the checkpoint."""
    if configured == OFF:
        return None
    return Path(configured) if configured else default_path(checkpoint())


def triton_cache_dir() -> Path | None:
    """Where Triton keeps its compiled kernels: TRITON_CACHE_DIR (what `--cache-dir` sets), else Triton's own
    default; None without Triton."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    try:
        import triton
    except ImportError:
        return None
    knobs = getattr(triton, "knobs", None)  # Triton 3.3 and later
    if knobs is not None and getattr(knobs.cache, "dir", None):
        return Path(knobs.cache.dir)
    return Path.home() / ".triton" / "cache"


def save(path: str | Path) -> dict:
    """Write what this process compiled to `path` (atomically); returns what it holds."""
    path = Path(path)
    start = time.perf_counter()
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        raise RuntimeError("nothing was compiled in this process: there is no compile cache to write")
    blob, info = artifacts
    triton_dir = triton_cache_dir()
    triton_files = sorted(p for p in triton_dir.rglob("*") if p.is_file()) if triton_dir and triton_dir.is_dir() else []
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr(TORCH_ENTRY, blob)
        for f in triton_files:
            z.write(f, TRITON_PREFIX + f.relative_to(triton_dir).as_posix())
    os.replace(tmp, path)
    summary = {
        "path": str(path),
        "bytes": path.stat().st_size,
        "torch_entries": {k: len(v) for k, v in info.artifacts.items()},
        "triton_files": len(triton_files),
    }
    logger.info(
        f"wrote the compile cache {path} ({summary['bytes'] / 2**20:.1f} MiB: torch {summary['torch_entries']}, "
        f"{len(triton_files)} Triton files) in {time.perf_counter() - start:.1f} s"
    )
    return summary


def load(path: str | Path) -> bool:
    """Load the artifact at `path` into this machine's compile caches (before anything compiles); whether it was
    there. Bytes already loaded into these caches (`loaded_marker`) are not loaded again. A damaged file is logged
    and skipped: the model then compiles as it would without it."""
    path = Path(path)
    if not path.is_file():
        return False
    start = time.perf_counter()
    try:
        data = path.read_bytes()
        loaded = loaded_marker(data)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            triton_dir = triton_cache_dir()
            names = [n for n in z.namelist() if n.startswith(TRITON_PREFIX) and not n.endswith("/")]
            kernels_there = triton_dir is not None and all(_triton_target(triton_dir, n).is_file() for n in names)
            if loaded is not None and loaded.is_file() and (kernels_there or not names):
                # torch's loading writes its entries into the on-disk caches, which still hold them: nothing to do
                logger.info(f"compile cache {path}: already in this machine's caches ({loaded.parent})")
                return True
            written = 0
            if triton_dir is not None:
                for name in names:
                    target = _triton_target(triton_dir, name)
                    if target.exists():
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part = target.with_name(target.name + ".part")
                    part.write_bytes(z.read(name))
                    os.replace(part, target)
                    written += 1
            blob = z.read(TORCH_ENTRY)
        info = torch.compiler.load_cache_artifacts(blob)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, RuntimeError) as e:
        logger.warning(f"compile cache {path} not used ({type(e).__name__}: {e}): compiling instead")
        return False
    if info is None:  # torch logs what was wrong with the bytes and loads nothing
        logger.warning(f"compile cache {path} not used (torch could not read it): compiling instead")
        return False
    if loaded is not None:
        with contextlib.suppress(OSError):  # a read-only cache: loaded again next time
            loaded.parent.mkdir(parents=True, exist_ok=True)
            loaded.touch()
    entries = {k: len(v) for k, v in info.artifacts.items()}
    logger.info(
        f"loaded the compile cache {path} in {time.perf_counter() - start:.1f} s (torch {entries}, "
        f"{written} of {len(names)} Triton files new)"
    )
    return True


def _triton_target(triton_dir: Path | None, name: str) -> Path:
    """Where an artifact's Triton entry goes; a crafted name must not point outside the Triton cache."""
    if triton_dir is None:
        raise ValueError("no Triton cache folder to put the artifact's kernels in")
    target = (triton_dir / name[len(TRITON_PREFIX) :]).resolve()
    if not target.is_relative_to(triton_dir.resolve()):
        raise ValueError(f"entry {name!r} points outside the Triton cache")
    return target


def loaded_marker(data: bytes) -> Path | None:
    """A file in inductor's cache folder that says these artifact bytes were loaded into it (named by their
    SHA-256): a warm restart then skips loading them again (seconds). None where torch does not say where that
    folder is."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        return None
    return Path(cache_dir()) / "flux-compile-cache" / hashlib.sha256(data).hexdigest()


def read_entries(path: str | Path) -> list[str]:
    """The names inside an artifact (for checks and tests)."""
    with zipfile.ZipFile(io.BytesIO(Path(path).read_bytes())) as z:
        return z.namelist()
