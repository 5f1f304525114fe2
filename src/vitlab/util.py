"""Small helpers shared by the engine and the weight code: atomic file writes, model unwrapping, and
torch.load errors in one safe line."""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc, kernel >= 4.7):
    setting and restoring it would race with files other threads create meanwhile."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)  # elsewhere the only way to read it: set, then restore at once
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then rename the temporary file over `path`.

    The temporary file is a hidden sibling (`.NAME.XXXX.tmp`), so the rename is atomic: a kill at
    any moment leaves either the old file or the new one, never half of one. mkstemp creates files
    with mode 0600; the result gets the mode a plain `open()` would give it (0666 minus the umask).
    The temporary file is removed on any failure, KeyboardInterrupt included.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def why_unloadable(e: Exception) -> str:
    """torch.load's complaint in one line, without its advice to retry with weights_only=False
    (which would run whatever the file's pickle asks for)."""
    text = " ".join(str(e).split())
    if "Weights only load failed" in text:
        m = re.search(r"(Unsupported|unsupported)[^.]*", text)
        detail = f": {m.group(0)}" if m else ""
        return (f"it holds pickled objects other than tensors and plain values{detail}; refused, since "
                f"loading them could run code")
    return f"{type(e).__name__}: {text[:200]}"


def printable(text: str | os.PathLike) -> str:
    """`text` with control and undecodable characters escaped (`\\n`, `\\x1b`, `\\udcff`): one line, always
    encodable, so a file name cannot fake rows of a table or lines of a message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers, in either order
    (DDP(compile(m)) as vitlab builds it, or compile(DDP(m)))."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module) or inner is model:
            return model
        model = inner


__all__ = ["atomic_write", "atomic_write_text", "printable", "unwrap_model", "why_unloadable", "TMP_SUFFIX"]


def cache_root() -> Path:
    """$VITLAB_CACHE, else $XDG_CACHE_HOME/vitlab, else ~/.cache/vitlab (where data/sources.py
    also looks for datasets): autotune results, decoded image folders, on-the-fly ONNX exports."""
    if os.environ.get("VITLAB_CACHE"):
        return Path(os.environ["VITLAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vitlab"
    return Path.home() / ".cache" / "vitlab"
