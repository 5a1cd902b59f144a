"""An on-disk cache of preprocessed (eval-mode) volumes.

Reading, reorienting, resampling and resizing a CT takes seconds; reading the finished
(1, D, H, W) tensor back takes milliseconds. Entries are safetensors files (no pickles) holding
**float16**: the pipeline's output lies in [0, 1], where float16 is exact to 2^-11 (under 0.05 %,
about 1 HU in a 2000 HU window), while uint8 would step in 1/255 of the window (8 HU for
[-1000, 1000]) and flatten soft-tissue contrast. It is half the size of float32.

Keys: the volume's identity (resolved path plus size and mtime_ns of every file it is read from;
for a DICOM folder, every file in it) and the preprocessing parameters (``size``, ``window``,
``spacing``, ``orientation``, ``crop_foreground``, the pipeline and MONAI versions). A changed
file or changed parameters give a new key, so a stale entry is never read. Each entry stores its
key and a BLAKE2b checksum of the tensor bytes; a truncated or corrupt entry fails those checks
and is rebuilt. Writes go to a temporary file renamed into place (``os.replace``), so parallel
workers and interrupted runs never leave a half-written entry under a real name.

The folder carries ``medmvl-cache.json``, written before the first entry. medmvl writes only into a
folder that has it, is new or empty, or holds nothing but the cache's own ``xx/`` entry folders (a
cache made before the marker); any other folder is refused, so that ``data.cache_dir`` pointed at
a folder of one's own never gets files mixed into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from medmvl_cli.data.limits import DEFAULT_MAX_VOXELS
from medmvl_cli.data.volume_io import source_files
from medmvl_cli.data.volume_transforms import VolumeParams, load_volume
from medmvl_cli.errors import DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"
CACHE_DTYPE = torch.float16
_TENSOR = "volume"
_SUFFIX = ".safetensors"
MARKER = "medmvl-cache.json"
_ENTRY_FOLDER = re.compile(r"^[0-9a-f]{2}$")


@dataclasses.dataclass
class FillReport:
    """What ``VolumeCache.fill`` did: entries built, entries already valid, and failures."""

    built: int = 0
    cached: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, message)

    @property
    def total(self) -> int:
        return self.built + self.cached + len(self.failed)


def source_identity(path: str | Path) -> dict:
    """Resolved path plus (name, size, mtime_ns) of every file the volume is read from."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise DataError(f"{path}: no such volume file or folder.",
                        hint="Check `volume_root` and the `image3d` paths of the annotation file.")
    files = []
    for file in source_files(resolved):
        try:
            stat = file.stat()
        except OSError:  # e.g. the .raw of a .mhd is missing: reading will report it
            files.append([file.name, -1, -1])
            continue
        files.append([file.name, stat.st_size, stat.st_mtime_ns])
    return {"path": str(resolved), "files": files}


def params_hash(cfg: Any) -> str:
    """A hash of the parameters the eval-mode tensor depends on."""
    import monai

    payload = {**VolumeParams.from_config(cfg).eval_dict(), "monai": monai.__version__, "dtype": str(CACHE_DTYPE)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _is_cache_layout(path: Path) -> bool:
    """An entry the cache itself makes at the top of its folder."""
    return (path.is_dir() and bool(_ENTRY_FOLDER.match(path.name))) or (
        path.name.startswith(".") and path.name.endswith(".tmp"))


def claim_cache_dir(cache_dir: Path) -> None:
    """Make sure `cache_dir` is medmvl's volume cache before anything is written into it."""
    if (cache_dir / MARKER).is_file():
        return
    if cache_dir.is_dir():
        foreign = sorted(p.name for p in cache_dir.iterdir() if not _is_cache_layout(p))
        if foreign:
            raise DataError(
                f"data.cache_dir {cache_dir} is not a medmvl volume cache (it has no {MARKER} and holds "
                f"{len(foreign)} other entr{'y' if len(foreign) == 1 else 'ies'})",
                hint="set data.cache_dir to a new or empty folder; medmvl writes only into its own cache folders")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{MARKER}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"format": "medmvl-volume-cache", "version": int(CACHE_FORMAT)}) + "\n")
        os.replace(tmp, cache_dir / MARKER)
    except OSError as err:
        raise DataError(f"data.cache_dir {cache_dir}: cannot create the volume cache ({err.strerror or err})",
                        hint="Check that `data.cache_dir` is writable and has free space.") from None


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.contiguous().view(torch.uint8).numpy(), digest_size=16).hexdigest()


class VolumeCache:
    """``VolumeCache(cache_dir).load(path, cfg)`` gives what ``load_volume(path, cfg)`` gives,
    rounded to float16, reading it from ``cache_dir`` when a valid entry exists. Sources whose
    header declares more than ``max_voxels`` voxels are refused, as ``read_volume`` does."""

    def __init__(self, cache_dir: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS):
        self.cache_dir = Path(cache_dir).expanduser()
        claim_cache_dir(self.cache_dir)
        self.max_voxels = max_voxels

    def key(self, path: str | Path, cfg: Any) -> str:
        identity = json.dumps({"format": CACHE_FORMAT, "source": source_identity(path),
                               "params": params_hash(cfg)}, sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}{_SUFFIX}"

    def get(self, path: str | Path, cfg: Any) -> torch.Tensor | None:
        """The cached float32 tensor, or ``None`` when there is no valid entry."""
        return self._read(self.key(path, cfg), VolumeParams.from_config(cfg))

    def load(self, path: str | Path, cfg: Any) -> torch.Tensor:
        """The preprocessed (1, D, H, W) float32 tensor; built and stored on a miss."""
        tensor, _ = self._ensure(path, VolumeParams.from_config(cfg))
        return tensor

    def fill(
        self,
        paths: Iterable[str | Path],
        cfg: Any,
        workers: int = 0,
        progress: Callable[[int, int, str], None] | None = None,
        executor: str = "process",
    ) -> FillReport:
        """Build every missing or invalid entry.

        ``workers`` > 1 runs that many jobs at once, in processes (``executor="process"``:
        forked from a server that imports MONAI once, seconds, then scales with cores; best for
        long runs and DICOM, whose header parsing holds the GIL) or threads (``"thread"``: no
        start-up cost; the heavy steps release the GIL). ``progress(done, total, path)`` is called as each volume
        finishes. A file that cannot be read is listed in the report's ``failed`` and does not
        stop the others.
        """
        if executor not in ("process", "thread"):
            raise ValueError(f"executor must be 'process' or 'thread', got {executor!r}")
        params = VolumeParams.from_config(cfg)
        unique = list(dict.fromkeys(str(Path(p).expanduser().resolve()) for p in paths))
        report = FillReport()
        total = len(unique)

        def record(done: int, path: str, status: str, message: str) -> None:
            if status == "built":
                report.built += 1
            elif status == "cached":
                report.cached += 1
            else:
                report.failed.append((path, message))
                logger.warning("%s", message)
            if progress is not None:
                progress(done, total, path)

        if workers <= 1 or total <= 1:
            for done, path in enumerate(unique, 1):
                record(done, *_fill_one(str(self.cache_dir), path, params, self.max_voxels))
            return report

        with _pool(executor, min(workers, total)) as pool:
            futures = [pool.submit(_fill_one, str(self.cache_dir), path, params, self.max_voxels) for path in unique]
            for done, future in enumerate(as_completed(futures), 1):
                record(done, *future.result())
        return report

    # ------------------------------------------------------------------------------ internals

    def _ensure(self, path: str | Path, params: VolumeParams) -> tuple[torch.Tensor, bool]:
        """(tensor, built): read a valid entry, or preprocess, store and return the result."""
        key = self.key(path, params)
        cached = self._read(key, params)
        if cached is not None:
            return cached, False
        volume = load_volume(path, params, train=False, max_voxels=self.max_voxels).to(CACHE_DTYPE)
        if self.key(path, params) == key:
            self._write(key, volume, path, params)
        else:  # the file changed while it was read: do not file the result under either key
            logger.warning("%s changed while it was being preprocessed; not cached.", path)
        return volume.to(torch.float32), True

    def _read(self, key: str, params: VolumeParams) -> torch.Tensor | None:
        from safetensors import SafetensorError, safe_open

        entry = self.entry_path(key)
        if not entry.is_file():
            return None
        try:
            with safe_open(str(entry), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensor = handle.get_tensor(_TENSOR)
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as err:
            logger.warning("cache entry %s is unreadable (%s); rebuilding it.", entry, err)
            return None
        expected = (1, *params.size)
        if (meta.get("key") != key or meta.get("format") != CACHE_FORMAT or tuple(tensor.shape) != expected
                or tensor.dtype != CACHE_DTYPE or meta.get("checksum") != _checksum(tensor)):
            logger.warning("cache entry %s fails its checks (corrupt or foreign); rebuilding it.", entry)
            return None
        return tensor.to(torch.float32)

    def _write(self, key: str, volume: torch.Tensor, path: str | Path, params: VolumeParams) -> None:
        from safetensors.torch import save_file

        entry = self.entry_path(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        volume = volume.contiguous()
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "checksum": _checksum(volume),
            "source": str(path),
            "params": json.dumps(params.eval_dict(), sort_keys=True),
        }
        try:
            save_file({_TENSOR: volume}, str(tmp), metadata=meta)
            os.replace(tmp, entry)
        except OSError as err:
            raise DataError(f"{entry}: cannot write the volume cache entry ({err}).",
                            hint="Check that `data.cache_dir` is writable and has free space.") from err
        finally:
            tmp.unlink(missing_ok=True)


def _pool(executor: str, workers: int) -> Executor:
    if executor == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="volume-cache")
    import multiprocessing

    # Not fork: forking a process whose torch / OpenMP threads are running can hang the child.
    # A fork server imports this module (and MONAI) once and forks the workers from it.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _fill_one(cache_dir: str, path: str, params: VolumeParams, max_voxels: int) -> tuple[str, str, str]:
    """One fill job (runs in a worker process): (path, "built" | "cached" | "failed", message)."""
    try:
        _, built = VolumeCache(cache_dir, max_voxels)._ensure(path, params)
    except DataError as err:
        return path, "failed", str(err)
    return path, "built" if built else "cached", ""
