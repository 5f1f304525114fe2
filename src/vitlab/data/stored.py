"""Image folders larger than memory: decoded on the fly by worker processes, or once into a cache.

`data.storage` picks how an image folder's split is held (named datasets are always in memory):
- memory: decoded once, whole, into one uint8 tensor (`folders.decode_files`); fastest, and
  needs N x C x size x size bytes (100k images at 224 px: 15 GB);
- stream: the files are checked by their headers first (`folders.probe_files`); each batch is then
  decoded when needed by `data.workers` processes (started once and shared by the run's splits), a
  few batches ahead. Memory holds those batches only; every epoch decodes every image again;
- cache: decoded once into a file of raw uint8 images under `data.cache_dir` (default
  ~/.cache/vitlab/decoded, or under $VITLAB_CACHE), built with bounded memory and reused by later epochs and later runs:
  a batch is then a few reads the OS serves from its page cache. The file's name is a hash of the
  folder's content (each file's path relative to the folder, size and modification time), the
  image size and the channels: an edited folder gets a new cache, an unchanged one is never
  decoded twice;
- auto: memory when the decoded split takes under a quarter of the memory available, else stream.

Batches are the same whatever the storage: image i is decoded by the same function from the same
file, and the loader's order and augmentation seeds do not depend on it, so a run resumes exactly
and gives the same weights in memory, streamed or cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError, ImageError
from ..limits import available_memory
from ..util import cache_root, printable
from . import folders

STORAGES = ("auto", "memory", "stream", "cache")
CACHE_VERSION = 1  # bump when decode_image's output changes: old caches are then not found
MEMORY_FRACTION = 0.25  # auto: in memory when the decoded split needs at most this share of available memory


def default_cache_dir() -> Path:
    return cache_root() / "decoded"


def choose_storage(storage: str, n: int, shape: tuple[int, int, int]) -> str:
    """`storage` with auto resolved for a split of n images of `shape` (C, H, W): memory when they
    take under MEMORY_FRACTION of the available memory, shared by the processes torchrun starts on
    this machine (LOCAL_WORLD_SIZE), else stream."""
    if storage not in STORAGES:
        raise ConfigError(f"data.storage={storage!r} must be one of {STORAGES}")
    if storage != "auto":
        return storage
    need = n * int(np.prod(shape))
    free = available_memory()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return "memory" if free is None or need <= MEMORY_FRACTION * free / max(1, local) else "stream"


# ---- worker jobs ----------------------------------------------------------------------------
def _decode_batch(job: tuple[list[str], int, int]) -> np.ndarray | ImageError:
    """(B, C, size, size) uint8 for the files, or the first file's ImageError (as a value)."""
    files, size, channels = job
    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for j, f in enumerate(files):
        try:
            out[j] = folders.decode_image(f, size, channels)
        except ImageError as e:
            return e
    return out


def _decode_each(job: tuple[list[str], int, int]) -> list[np.ndarray | ImageError]:
    files, size, channels = job
    return [folders._decode_or_error((f, size, channels)) for f in files]


def ordered(pool: ProcessPoolExecutor | None, fn, jobs: Iterable, ahead: int) -> Iterator:
    """fn(job) for each job, in order, with at most `ahead` jobs submitted and not yet taken: the
    memory a stream holds is bounded however slow its consumer is. Without a pool, in this process."""
    if pool is None:
        yield from map(fn, jobs)
        return
    queue: deque = deque()
    it = iter(jobs)
    try:
        for job in it:
            queue.append(pool.submit(fn, job))
            if len(queue) >= ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    except BrokenProcessPool:  # the pool's next user gets a fresh one (DecodePool.get)
        raise DataError("a process decoding images died (out of memory?)") from None
    finally:
        for fut in queue:
            fut.cancel()


class DecodePool:
    """`workers` decoding processes shared by the streamed splits alive in this process (a run's
    train, val and test; see shared_pool): started on first use, kept across epochs and evaluations,
    replaced when a worker has died (even while idle), shut down with `close()` or when the last
    split using it is gone. Workers ignore Ctrl-C: the main process handles it and shuts them down."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._closer: weakref.finalize | None = None

    def get(self) -> ProcessPoolExecutor:
        if self._executor is not None:
            try:
                self._executor.submit(int).result()  # one round trip: has a worker died since the last stream?
            except BrokenProcessPool:
                self.close()
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, initializer=_ignore_sigint)
            self._closer = weakref.finalize(self, _shut_down, self._executor)  # also at interpreter exit
        return self._executor

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
        self._executor = self._closer = None


def _shut_down(executor: ProcessPoolExecutor) -> None:
    executor.shutdown(wait=True, cancel_futures=True)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (pid, workers) -> DecodePool


def shared_pool(workers: int) -> DecodePool | None:
    """The DecodePool of `workers` processes that this process's live streams share (a new one once
    none is left; keyed by pid too, so a forked child never uses its parent's); None for 0 or 1 worker
    (decoding in this process)."""
    if workers <= 1:
        return None
    key = (os.getpid(), workers)
    pool = _SHARED.get(key)
    if pool is None:
        pool = _SHARED[key] = DecodePool(workers)
    return pool


# ---- streamed --------------------------------------------------------------------------------
class FolderStream:
    """N image files decoded on demand: indexing decodes those files here; `batches` decodes a
    sequence of index batches in worker processes, 2 x workers batches ahead."""

    dtype = torch.uint8

    def __init__(self, files: list[str], size: int, channels: int, workers: int | None = None):
        self.files, self.size, self.channels = list(files), size, channels
        self.workers = workers if workers is not None else folders.default_workers()
        self.pool = shared_pool(self.workers)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.files)

    def _rows(self, idx) -> list[int]:
        if isinstance(idx, slice):
            return list(range(len(self.files)))[idx]
        return [int(i) for i in np.asarray(idx).reshape(-1)]

    def subset(self, idx) -> FolderStream:
        return FolderStream([self.files[i] for i in self._rows(idx)], self.size, self.channels, self.workers)

    def _checked(self, out: np.ndarray | ImageError) -> torch.Tensor:
        if isinstance(out, ImageError):
            raise DataError(f"{out}: it passed the header check before training but cannot be decoded; remove "
                            f"it and start the run again, or use data.storage=cache (every file decoded once, "
                            f"before training)")
        return torch.from_numpy(out)

    def __getitem__(self, idx) -> torch.Tensor:
        return self._checked(_decode_batch(([self.files[i] for i in self._rows(idx)], self.size, self.channels)))

    def batches(self, index_batches: Iterable) -> Iterator[torch.Tensor]:
        jobs = (([self.files[i] for i in self._rows(idx)], self.size, self.channels) for idx in index_batches)
        for out in ordered(self.pool and self.pool.get(), _decode_batch, jobs, 2 * self.workers):
            yield self._checked(out)


# ---- cached ----------------------------------------------------------------------------------
class DecodedCache:
    """Rows of a file of raw (C, size, size) uint8 images, read with `os.pread` into each batch:
    no mapping, so the process's memory holds one batch, and the OS's page cache makes repeated
    epochs run at memory speed."""

    dtype = torch.uint8

    def __init__(self, path: Path, rows: np.ndarray, size: int, channels: int):
        self.path, self.rows, self.size, self.channels = Path(path), np.asarray(rows, dtype=np.int64), size, channels
        self.row_bytes = channels * size * size
        self._fd: int | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):  # an open descriptor does not travel to another process
        return {**self.__dict__, "_fd": None}

    def subset(self, idx) -> DecodedCache:
        return DecodedCache(self.path, self.rows[np.asarray(idx).reshape(-1)] if not isinstance(idx, slice)
                            else self.rows[idx], self.size, self.channels)

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self.rows[idx] if isinstance(idx, slice) else self.rows[np.asarray(idx).reshape(-1)]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        out = np.empty((len(rows), self.channels, self.size, self.size), dtype=np.uint8)
        flat = out.reshape(len(rows), self.row_bytes)
        for j, r in enumerate(rows):
            got = os.preadv(self._fd, [flat[j]], int(r) * self.row_bytes)
            if got != self.row_bytes:
                raise DataError(f"decoded cache {printable(self.path)} is shorter than its index says (row {r}); "
                                f"delete it to rebuild")
        return torch.from_numpy(out)

    def batches(self, index_batches: Iterable) -> Iterator[torch.Tensor]:
        return (self[idx] for idx in index_batches)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def cache_key(root: Path, files: list[Path], size: int, channels: int) -> str:
    """A hash of what the decoded images depend on: each file's path relative to `root`, its size
    and modification time, the image size, the channels, the decoder's version and Pillow's."""
    import PIL
    h = hashlib.sha256(f"vitlab-decoded-v{CACHE_VERSION}|Pillow {PIL.__version__}|{size}|{channels}|"
                       f"{len(files)}".encode())  # another Pillow may decode (resize) differently
    for f in files:
        st = os.stat(f)
        h.update(f"\0{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def open_cache(files: list[Path], labels: list[int], size: int, channels: int, root: Path, cache_dir: Path,
               workers: int | None = None, strict: bool = False, classes: list[str] | None = None,
               log=print) -> tuple[DecodedCache, np.ndarray]:
    """(the cache of these files, the indices of the files it holds), built first if missing.

    Building decodes every file once in worker processes, writing each image as it arrives (memory
    holds a few chunks), into a temporary file renamed into place with its index (`.json`) at the
    end, so a stopped build leaves nothing a later run would trust. Unreadable files are handled
    as in memory (`folders.usable`: skipped with a warning, or an error)."""
    cache_dir = Path(cache_dir).expanduser()
    key = cache_key(root, files, size, channels)
    data_path, index_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    row = channels * size * size
    if index_path.is_file() and data_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            keep = np.asarray(index["keep"], dtype=np.int64)
            ok = (index.get("key") == key and data_path.stat().st_size == len(keep) * row
                  and (keep.size == 0 or (keep.min() >= 0 and keep.max() < len(files)
                                          and bool(np.all(np.diff(keep) > 0)))))  # increasing: one row a file
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            if len(keep) < len(files):  # the files skipped when it was built: said again, or refused
                skipped = sorted(set(range(len(files))) - set(keep.tolist()))
                listing = folders._listing([(files[i], "unreadable when the cache was built") for i in skipped])
                if strict:
                    raise DataError(f"{len(skipped)} unreadable file(s): {listing}")
                warnings.warn(f"skipped {len(skipped)} unreadable file(s): {listing}", stacklevel=3)
            return DecodedCache(data_path, np.arange(len(keep)), size, channels), keep
        log(f"decoded cache {printable(data_path)} does not match its index; rebuilding it")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob("*.partial"):  # builds killed a day ago or more (OOM, kill -9)
            try:
                if time.time() - stale.stat().st_mtime > 86400:
                    stale.unlink()
            except OSError:  # another process's, gone meanwhile
                pass
        free = shutil.disk_usage(cache_dir).free
    except OSError as e:
        raise DataError(f"cannot use the cache folder {printable(cache_dir)} (data.cache_dir): {e.strerror or e}") \
            from None
    need = len(files) * row
    if need > free:
        raise DataError(f"the decoded cache of {len(files)} images at {size}x{size} needs {need / 2**30:.1f} GiB but "
                        f"{printable(cache_dir)} has {free / 2**30:.1f} GiB free; set data.cache_dir to a larger disk "
                        f"or use data.storage=stream")
    log(f"decoding {len(files)} images at {size}x{size} into the cache {printable(data_path)} "
        f"({need / 2**30:.2f} GiB, once)")
    started = time.time()
    workers = workers if workers is not None else folders.default_workers()
    chunk = 64
    jobs = (([str(f) for f in files[i:i + chunk]], size, channels) for i in range(0, len(files), chunk))
    results: list = []  # None for a file written, its ImageError otherwise
    tmp = data_path.with_name(f"{data_path.name}.{os.getpid()}.partial")
    pool = DecodePool(workers) if workers > 1 else None  # its own: nothing decodes after the build
    try:
        with open(tmp, "wb") as f:
            for outs in ordered(pool and pool.get(), _decode_each, jobs, 2 * workers):
                for out in outs:
                    if isinstance(out, ImageError):
                        results.append(out)
                    else:
                        f.write(np.ascontiguousarray(out).tobytes())
                        results.append(None)
            f.flush()
            os.fsync(f.fileno())
        keep = folders.usable(results, files, strict, labels, classes, root)
        os.replace(tmp, data_path)
        index_tmp = index_path.with_name(index_path.name + f".{os.getpid()}.partial")
        index_tmp.write_text(json.dumps({"key": key, "size": size, "channels": channels, "root": str(root),
                                         "files": len(files), "keep": keep.tolist()}))
        os.replace(index_tmp, index_path)
    except OSError as e:  # a full disk, a vanished folder
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the decoded cache {printable(data_path)}: {e.strerror or e}; set "
                        f"data.cache_dir to a larger disk or use data.storage=stream") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
    log(f"decoded cache built in {time.time() - started:.0f} s")
    return DecodedCache(data_path, np.arange(len(keep)), size, channels), keep


__all__ = ["STORAGES", "FolderStream", "DecodedCache", "open_cache", "choose_storage", "default_cache_dir"]
