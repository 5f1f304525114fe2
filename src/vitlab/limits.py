"""What this process may use of the machine it runs on: CPUs and memory.

A container (Docker's --cpus / --memory, Kubernetes limits, a systemd slice) holds a process to less
than the machine through its cgroup: a CPU quota (cgroup v2 `cpu.max`; v1 `cpu.cfs_quota_us` over
`cpu.cfs_period_us`) and a memory limit. /proc/cpuinfo and the CPU affinity still list every core, and
torch starts one thread per core, so under a quota its threads run in turns. Measured by
benchmarks/cpu_quota.py (vit_tiny_patch4_32 training step, batch 128, bf16; the thread counts take
turns in one process; 2-core AMD EPYC with AVX-512-BF16, cgroup v1), img/s:

    quota (CPUs)    1 thread    2 threads (torch's default)
    1.0             256.5       202.0
    1.2             255.0       256.2
    1.5             251.0       335.8
    2.0             257.8       418.2

so the threads that pay are the quota rounded to the nearest whole CPU (usable_cpus()): the crossover
lies between 1.2 and 1.5 CPUs on this 2-core machine (at 1.2 the two tie within noise); rounding to the
nearest is the simplest rule that puts it there, not a measurement on larger machines.
Limits anywhere on the cgroup's path apply, so the lowest one counts, up to the top of the hierarchy as
this process sees it (its mount point: inside a cgroup namespace, limits set above it are not visible).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

PROC_CGROUP = "/proc/self/cgroup"
PROC_MOUNTINFO = "/proc/self/mountinfo"
PROC_MEMINFO = "/proc/meminfo"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: str | Path) -> int | None:
    text = _read(Path(path))
    if text is None:
        return None
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else None  # "max" (no limit) and junk: None


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_dirs(controller: str, proc_cgroup: str | Path = PROC_CGROUP,
                mountinfo: str | Path = PROC_MOUNTINFO) -> list[Path]:
    """This process's cgroup folders for `controller` ("cpu", "memory"), its own first, then each
    parent up to the hierarchy's mount point. cgroup v1 where the controller has a hierarchy of its
    own, else the v2 hierarchy. [] where neither can be read (not Linux, no cgroup mounted) or no
    mount shows the process's cgroup."""
    groups = _read(Path(proc_cgroup))
    mounts = _read(Path(mountinfo))
    if groups is None or mounts is None:
        return []
    paths = {}  # "v1" / "v2" -> the process's path in that hierarchy
    for line in groups.splitlines():
        parts = line.split(":", 2)  # "ID:CONTROLLERS:PATH"
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths.setdefault("v2", parts[2])
        elif controller in parts[1].split(","):
            paths.setdefault("v1", parts[2])
    for version in ("v1", "v2"):
        if version not in paths:
            continue
        shown = []  # (root, mount point) of each mount of this hierarchy that shows the process's cgroup
        for line in mounts.splitlines():
            fields = line.split()
            if "-" not in fields[4:]:
                continue
            sep = fields.index("-", 4)
            if len(fields) < sep + 4:
                continue
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            if (version == "v1" and fstype == "cgroup" and controller in options) or \
                    (version == "v2" and fstype == "cgroup2"):
                root = _unescape(fields[3]).rstrip("/")
                inside = paths[version][len(root):].split("/")
                if (paths[version] == root or paths[version].startswith(root + "/")) and ".." not in inside:
                    shown.append((root, Path(_unescape(fields[4]))))
        if shown:  # the mount closest to the process's own cgroup
            root, mount = max(shown, key=lambda m: len(m[0]))
            parts = [p for p in paths[version][len(root):].split("/") if p and p != "."]
            return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return []  # no mount shows this process's cgroup: unknown, not someone else's limits


def cpu_quota(proc_cgroup: str | Path = PROC_CGROUP, mountinfo: str | Path = PROC_MOUNTINFO) -> float | None:
    """CPUs' worth of time per period that this process's cgroup allows (1.5: one and a half CPUs),
    the lowest along its path; None where there is no quota or it cannot be read."""
    lowest = None
    for folder in cgroup_dirs("cpu", proc_cgroup, mountinfo):
        quota = period = None
        v2 = _read(folder / "cpu.max")  # "max 100000" or "150000 100000"
        if v2 is not None:
            fields = v2.split()
            if len(fields) == 2 and all(re.fullmatch(r"[0-9]+", f) for f in fields):  # not isdigit(): "²"
                quota, period = int(fields[0]), int(fields[1])
        else:
            quota, period = _read_int(folder / "cpu.cfs_quota_us"), _read_int(folder / "cpu.cfs_period_us")
        if quota is not None and period and quota > 0 and period > 0:
            cpus = quota / period
            lowest = cpus if lowest is None else min(lowest, cpus)
    return lowest


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all of them where that is not reported)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_cpus(proc_cgroup: str | Path = PROC_CGROUP, mountinfo: str | Path = PROC_MOUNTINFO) -> int:
    """CPUs this process can keep busy: the ones it may run on, fewer under a CPU quota, which
    counts rounded to the nearest whole CPU (at least 1; the module docstring has the measurement)."""
    cpus = affinity_cpus()
    quota = cpu_quota(proc_cgroup, mountinfo)
    if quota is not None:
        cpus = min(cpus, max(1, int(quota + 0.5)))
    return cpus


def available_memory(proc_cgroup: str | Path = PROC_CGROUP, mountinfo: str | Path = PROC_MOUNTINFO,
                     meminfo: str | Path = PROC_MEMINFO) -> int | None:
    """Bytes of memory available to new allocations: Linux MemAvailable, lowered to what this
    process's cgroup (a container's limit, v2 or v1, the tightest along its path) still allows;
    None if unknown."""
    free = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    for folder in cgroup_dirs("memory", proc_cgroup, mountinfo):
        for limit_name, usage_name in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit, used = _read_int(folder / limit_name), _read_int(folder / usage_name)
            if limit is not None and used is not None and 0 <= limit < 1 << 60:
                room = max(0, limit - used)
                free = room if free is None else min(free, room)
    return free
