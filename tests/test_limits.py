"""vitlab.limits: a container's CPU quota and memory limit, read from cgroup trees built here (v1, v2,
a container's own view) the way Linux lays them out; and the torch thread count they lead to."""
from pathlib import Path

import pytest
import torch

from vitlab import limits
from vitlab.engine import runtime


def cgroup_tree(tmp_path: Path, version: str, path: str, root: str = "/", mount_name: str = "cpu",
                controllers: str = "cpu,cpuacct") -> tuple[Path, Path, Path]:
    """(/proc/self/cgroup, /proc/self/mountinfo, the hierarchy's mount point) for a process in cgroup
    `path` of a v1 (`controllers`) or v2 hierarchy mounted at tmp_path/mount_name, showing it from `root`."""
    mount = tmp_path / mount_name
    mount.mkdir(parents=True, exist_ok=True)
    escaped = str(mount).replace(" ", "\\040")
    if version == "v1":  # cpuset and name=systemd first: a substring match on "cpu" would take them
        groups = f"9:pids:/other\n3:cpuset:/wrong\n1:name=systemd:/wrong\n4:{controllers}:{path}\n0::/\n"
        mounts = (f"31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
                  f"32 31 0:29 / {tmp_path / 'cpuset'} rw,relatime - cgroup cgroup rw,cpuset\n"
                  f"33 31 0:30 {root} {escaped} rw,relatime shared:9 - cgroup cgroup rw,{controllers}\n")
    else:
        groups = f"0::{path}\n"
        mounts = f"41 31 0:38 {root} {escaped} rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n"
    (tmp_path / "cgroup").write_text(groups)
    (tmp_path / "mountinfo").write_text(mounts)
    return tmp_path / "cgroup", tmp_path / "mountinfo", mount


def put(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text + "\n")


def test_a_v1_quota_is_the_lowest_along_the_path(tmp_path):
    cg, mi, mount = cgroup_tree(tmp_path, "v1", "/docker/abc")
    assert limits.cgroup_dirs("cpu", cg, mi) == [mount / "docker" / "abc", mount / "docker", mount]
    put(mount / "docker" / "abc", cpu__cfs_quota_us="150000", cpu__cfs_period_us="100000")
    assert limits.cpu_quota(cg, mi) == 1.5
    put(mount / "docker", cpu__cfs_quota_us="50000", cpu__cfs_period_us="50000")  # the parent's 1.0 binds
    assert limits.cpu_quota(cg, mi) == 1.0
    put(mount / "docker", cpu__cfs_quota_us="400000", cpu__cfs_period_us="100000")  # the child's 1.5 binds
    assert limits.cpu_quota(cg, mi) == 1.5
    put(mount / "docker", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")  # -1: no quota there
    assert limits.cpu_quota(cg, mi) == 1.5
    assert limits.cgroup_dirs("memory", cg, mi) == []  # no memory hierarchy, no v2 mount: nothing to read


def test_a_v2_quota_and_a_containers_own_view(tmp_path):
    cg, mi, mount = cgroup_tree(tmp_path, "v2", "/user.slice/job")
    put(mount / "user.slice" / "job", cpu__max="max 100000")
    assert limits.cpu_quota(cg, mi) is None
    put(mount / "user.slice", cpu__max="250000 100000")
    assert limits.cpu_quota(cg, mi) == 2.5
    # a container (cgroup namespace or a bind mount of its own folder) sees its cgroup at the mount point
    cg, mi, mount = cgroup_tree(tmp_path / "c", "v2", "/docker/abc", root="/docker/abc", mount_name="my cg")
    assert limits.cgroup_dirs("cpu", cg, mi) == [mount]  # the escaped space read back
    put(mount, cpu__max="300000 200000")
    assert limits.cpu_quota(cg, mi) == 1.5
    cg, mi, mount = cgroup_tree(tmp_path / "d", "v2", "/elsewhere", root="/docker/abc")
    assert limits.cgroup_dirs("cpu", cg, mi) == []  # outside what the mount shows: unknown, not its limits
    cg, mi, mount = cgroup_tree(tmp_path / "e", "v2", "/../sibling")  # outside a cgroup namespace's root
    assert limits.cgroup_dirs("cpu", cg, mi) == []


def test_the_mount_that_shows_the_cgroup_is_read(tmp_path):
    # two mounts of the v2 hierarchy: one shows another cgroup (/other), the second ours (/real/job)
    cg, mi, mount = cgroup_tree(tmp_path, "v2", "/real/job", root="/real", mount_name="real")
    other = tmp_path / "other"
    mi.write_text(f"40 31 0:38 /other {other} rw - cgroup2 cgroup2 rw\n"
                  f"42 31 0:38 / {tmp_path / 'all'} rw - cgroup2 cgroup2 rw\n" + mi.read_text())
    put(other, cpu__max="50000 100000")
    put(mount / "job", cpu__max="200000 100000")
    assert limits.cgroup_dirs("cpu", cg, mi) == [mount / "job", mount]  # the closer of the two that show it
    assert limits.cpu_quota(cg, mi) == 2.0
    # a v1 line for the controller but no v1 mount of it: the v2 hierarchy
    cg.write_text("4:cpu,cpuacct:/real/job\n0::/real/job\n")
    assert limits.cpu_quota(cg, mi) == 2.0


@pytest.mark.parametrize("text", ["junk", "100000", "-5 100000", "100000 0", "", "\u00b2 100000", "1e5 100000"])
def test_an_unreadable_quota_is_no_quota(tmp_path, text):
    cg, mi, mount = cgroup_tree(tmp_path, "v2", "/a")
    put(mount / "a", cpu__max=text)
    assert limits.cpu_quota(cg, mi) is None
    assert limits.cpu_quota(tmp_path / "missing", mi) is None and limits.cgroup_dirs("cpu", cg, tmp_path / "no") == []


@pytest.mark.parametrize("quota, cpus, usable", [(1.0, 8, 1), (1.2, 8, 1), (1.5, 8, 2), (0.3, 8, 1), (64.0, 8, 8),
                                                  (None, 8, 8), (2.5, 2, 2), (2.5, 8, 3)])
def test_usable_cpus_rounds_the_quota_to_the_nearest_cpu(monkeypatch, quota, cpus, usable):
    monkeypatch.setattr(limits, "cpu_quota", lambda *a: quota)
    monkeypatch.setattr(limits, "affinity_cpus", lambda: cpus)
    assert limits.usable_cpus() == usable


def test_available_memory_is_lowered_to_the_cgroups_room(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    8388608 kB\n")  # 8 GiB
    cg, mi, mount = cgroup_tree(tmp_path, "v1", "/a/job", controllers="memory", mount_name="memory")
    assert limits.available_memory(tmp_path / "none", mi, meminfo) == 8 * 2**30  # no cgroup: MemAvailable
    put(mount / "a" / "job", memory__limit_in_bytes=str(9 * 2**30), memory__usage_in_bytes=str(8 * 2**30))
    put(mount, memory__limit_in_bytes=str(2**63 - 4096), memory__usage_in_bytes="5")  # "no limit" at the top
    assert limits.available_memory(cg, mi, meminfo) == 2**30  # the job's own room
    put(mount / "a", memory__limit_in_bytes=str(3 * 2**30), memory__usage_in_bytes=str(int(2.5 * 2**30)))
    assert limits.available_memory(cg, mi, meminfo) == 2**29  # its parent's, tighter
    put(mount, memory__limit_in_bytes=str(2**61), memory__usage_in_bytes="0")  # huge: read as no limit
    assert limits.available_memory(cg, mi, meminfo) == 2**29
    cg, mi, mount = cgroup_tree(tmp_path / "v2", "v2", "/")
    put(mount, memory__max=str(2**20), memory__current=str(3 * 2**20))  # over its limit: no room
    assert limits.available_memory(cg, mi, meminfo) == 0


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_fit_threads_keeps_torch_within_the_usable_cpus(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)  # a 1-CPU quota on a 2-core machine
    assert runtime.fit_threads() == 1 and torch.get_num_threads() == 1
    assert runtime.fit_threads(3) == 3 and torch.get_num_threads() == 3  # asked for: as asked
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 8)
    torch.set_num_threads(2)
    assert runtime.fit_threads() == 2  # never more than torch's own count for one process
    assert runtime.fit_threads(local_world=4) == 2 and runtime.fit_threads(local_world=16) == 1  # shared by ranks
    torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1: the ranks still share the usable CPUs
    assert runtime.fit_threads(local_world=2) == 4 and torch.get_num_threads() == 4


def test_a_single_process_ignores_a_stray_local_world_size(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # left in the environment, no torchrun around
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    runtime.setup_runtime("cpu", "fp32")
    assert torch.get_num_threads() == 2


def test_every_command_starts_within_the_usable_cpus(monkeypatch, restore_threads, capsys):
    from vitlab import cli
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
    assert cli.main(["models", "vit_tiny_patch16_224"]) == 0
    assert torch.get_num_threads() == 1
