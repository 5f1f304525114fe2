"""The run directory: what it holds, who may write it, and whether a run there may start.

One process at a time writes a run directory: it holds an exclusive `flock` on RUN/.lock (the
kernel drops it when the process dies, `kill -9` included) and writes its pid, host and start
time there so that a second process can say who holds it. Under torchrun only rank 0 locks.

A run that stopped before its first checkpoint holds nothing worth keeping (settings, a few log
lines): a fresh run with the same --out takes it over, and `--resume` starts it from step 0.
A directory holding a checkpoint or a model is never taken over and nothing in it is deleted.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from pathlib import Path
from typing import IO

from ..errors import RunDirError
from ..util import TMP_SUFFIX
from .checkpoint import remove_stale_temporaries

LOCK_NAME = ".lock"
# What a run writes before its first checkpoint; a directory holding only these (and checkpoint
# temporaries) is a dead start.
_EARLY_FILES = {LOCK_NAME, "config.yaml", "env.json", "metrics.jsonl", "tensorboard", "checkpoints"}


class RunLock:
    """An exclusive flock on RUN/.lock, held until `release()` or the process ends."""

    def __init__(self, run_dir: Path):
        import fcntl
        self.path = run_dir / LOCK_NAME
        try:  # O_NOFOLLOW: a .lock that is a symlink must not truncate the file it points at
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise RunDirError(f"cannot open the lock file {self.path}: {e.strerror}"
                              + (" (it is a symbolic link)" if self.path.is_symlink() else "")) from None
        self.file: IO[str] | None = os.fdopen(fd, "r+")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = " ".join(self.file.read().split()) or "a process that has not written its name yet"
            self.file.close()
            self.file = None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"cannot lock {self.path}: {e.strerror}") from None
            raise RunDirError(f"{run_dir} is in use by another vitlab process ({holder}); wait for it to "
                              f"end or stop it, then run again") from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n")
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the flock
            self.file = None


def saved_results(run_dir: Path) -> list[str]:
    """What in a run directory must never be overwritten: checkpoints, the model, the results."""
    found = [p.name for p in (run_dir / "checkpoints").glob("*.pt")] if (run_dir / "checkpoints").is_dir() else []
    found += [name for name in ("model", "results.json") if (run_dir / name).exists()]
    return found


def _written_by_vitlab(run_dir: Path) -> bool:
    """RUN/.lock (taken before a run writes anything) or an env.json that vitlab wrote: a
    hand-written config.yaml in a user's folder is not a run to take over."""
    if (run_dir / LOCK_NAME).is_file():
        return True
    try:
        env = json.loads((run_dir / "env.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(env, dict) and "vitlab" in env


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)  # util.atomic_write's, left by a kill


def is_dead_start(run_dir: Path) -> bool:
    """A vitlab run directory (config.yaml, and .lock or vitlab's env.json) holding nothing but
    what a run writes before its first checkpoint."""
    if not (run_dir / "config.yaml").is_file() or saved_results(run_dir) or not _written_by_vitlab(run_dir):
        return False
    return all(p.name in _EARLY_FILES or _is_temporary(p.name) for p in run_dir.iterdir())


def check_fresh_out(out: Path) -> bool:
    """May a fresh run write `out`? True when it takes over a dead start; an error when `out`
    holds anything else. Reads only."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a run directory")
    if not out.exists() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return False
    if is_dead_start(out):
        return True
    kept = saved_results(out)
    what = f"it holds {', '.join(sorted(kept)[:4])}" if kept else "it is not empty"
    raise RunDirError(f"{out} already holds a run ({what}); resume it with `vitlab train --resume {out}` "
                      f"or choose another --out")


def reset_dead_start(run_dir: Path) -> None:
    """Forget the logs of a run that stopped before its first checkpoint (call holding the lock)."""
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    tb = run_dir / "tensorboard"
    if tb.is_dir():
        for p in tb.glob("events.out.tfevents.*"):
            p.unlink(missing_ok=True)
    remove_stale_temporaries(run_dir)
    for p in run_dir.iterdir():
        if _is_temporary(p.name) and p.is_file():
            p.unlink(missing_ok=True)


__all__ = ["RunLock", "check_fresh_out", "is_dead_start", "reset_dead_start", "saved_results"]
