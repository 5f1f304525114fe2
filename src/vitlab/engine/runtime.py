"""What the hardware can do and how this process runs: whether bf16 is fast here, the runtime
record (device, precision, rank, world size) and a description of the machine for logs."""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..errors import ConfigError
from ..limits import usable_cpus


def fast_bf16_available(device_type: str) -> bool:
    """True where bf16 matmuls run in hardware: CUDA GPUs with bf16 support, CPUs with AMX or
    AVX-512-BF16. Elsewhere bf16 is emulated and slower than fp32, so we keep fp32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """Versions and hardware, recorded next to every measured number."""
    info = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "fast_bf16_cpu": fast_bf16_available("cpu"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---- the runtime record ----------------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Runtime:
    """Device, precision and process-group facts, built once from the environment (torchrun's
    RANK / WORLD_SIZE / LOCAL_RANK included) and passed explicitly. Only rank 0 writes files."""
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    choice: dict | None = field(default=None, compare=False)
    """How precision, the attention kernel and the stem's input layout were chosen (engine/autotune.py),
    for env.json."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


MAX_THREADS = 1024


def check_runtime_settings(device: str, precision: str, threads: int | None, attn_impl: str,
                           stem_layout: str = "auto") -> None:
    """The runtime settings' values, without touching the hardware (see `resolve_device` for that)."""
    from ..model import ATTN_IMPLS, STEM_LAYOUTS
    problems = []
    try:
        torch.device(device) if device != "auto" else None
    except (RuntimeError, ValueError):
        problems.append(f"runtime.device={device!r} is not a device (auto, cpu, cuda, cuda:N)")
    if precision not in PRECISIONS:
        problems.append(f"runtime.precision={precision!r} must be one of {PRECISIONS}")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        problems.append(f"runtime.threads={threads} must be null (torch's choice) or in [1, {MAX_THREADS}]")
    if attn_impl not in ATTN_IMPLS:
        problems.append(f"runtime.attn_impl={attn_impl!r} must be one of {ATTN_IMPLS}")
    if stem_layout not in ("auto", *STEM_LAYOUTS):
        problems.append(f"runtime.stem_layout={stem_layout!r} must be one of {('auto', *STEM_LAYOUTS)}")
    if problems:
        raise ConfigError("; ".join(problems))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The torch device for a `runtime.device` setting on this machine (an error if it is absent)."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"runtime.device={device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"runtime.device={device!r}: vitlab trains on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device={device!r} but CUDA is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device={device!r} but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    return dev


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested not in PRECISIONS:
        raise ConfigError(f"runtime.precision={requested!r} must be one of {PRECISIONS}")
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError(f"runtime.precision='fp16' needs a CUDA device (device is {device})")
    if requested != "auto":
        return requested
    if fast_bf16_available(device.type):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def set_cudnn_attention(enabled: bool) -> None:
    """Whether scaled_dot_product_attention may dispatch to cuDNN's kernels (process-wide; CUDA only).

    Off for training unless asked for. On an H100 with torch 2.11, SDPA's default pick for
    vitlab's shapes (N=64 tokens, head dim 64, bf16) is cuDNN, and 6 of 15 CIFAR-10 runs of one
    sweep stopped on a NaN gradient norm after 260-1470 healthy steps (finite loss, gradient norms
    near 1; benchmarks/results/sweep.json). cuDNN's bf16 SDPA backward has open NaN reports of
    exactly this kind (pytorch/pytorch#196678, NVIDIA/cudnn-frontend#160, huggingface/trl#7181).
    With it off, SDPA takes flash or memory-efficient attention, which are as fast at these shapes
    (forward + backward at batch 256, 3 heads: cuDNN 0.86 ms, flash 0.84, memory-efficient 0.73)."""
    torch.backends.cuda.enable_cudnn_sdp(enabled)


def fit_threads(threads: int | None = None, local_world: int = 1) -> int:
    """Set torch's CPU threads and return the count: `threads` when given, else the CPUs this
    process can keep busy (limits.usable_cpus: its affinity and a container's CPU quota) shared by
    the `local_world` processes torchrun starts on this machine (over torchrun's OMP_NUM_THREADS=1,
    as before). One process alone keeps torch's own count (a thread per physical core, or the
    OMP_NUM_THREADS it was given) unless that is more than it can keep busy."""
    if threads:
        n = threads
    elif local_world > 1:
        n = max(1, usable_cpus() // local_world)
    else:
        n = min(torch.get_num_threads(), usable_cpus())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def setup_runtime(device: str = "auto", precision: str = "auto", threads: int | None = None,
                  cudnn_attention: bool = False) -> Runtime:
    """Read torchrun's environment, start the process group (NCCL on GPUs, gloo on CPU) and pick
    the device and precision. On CUDA, cuDNN's attention kernels stay off unless `cudnn_attention`
    (see set_cudnn_attention)."""
    import torch.distributed as dist
    rank, world, local = dist_env()
    dev = resolve_device(device, local)
    prec = resolve_precision(precision, dev)  # checked before the process group starts
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        set_cudnn_attention(cudnn_attention)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world > 1 and dev.type == "cpu" else 1
    fit_threads(threads, ranks_here)  # ranks on one machine share its CPUs
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, prec, rank, world, local)


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_ints(values: list[int], rt: Runtime) -> list[int]:
    """Rank 0's `values` on every rank (a few small integers: codes for a choice made on rank 0)."""
    if not rt.distributed:
        return list(values)
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.int64, device=rt.device)
    dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


def on_main(rt: Runtime, fn):
    """`fn()` on rank 0 only, then agree: if it raised, every rank raises (rank 0 its own error,
    the others one naming it), so no rank is left waiting in a collective for a rank that gave up.
    Returns fn's result on rank 0, None elsewhere."""
    error, result = None, None
    if rt.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    if rt.distributed:
        flag = torch.tensor([0.0 if error is None else 1.0], device=rt.device)
        failed = all_reduce_sum(flag, rt).item() > 0
        if failed:
            barrier(rt)  # no rank leaves (and tears down its sockets) while another still reads the flag
        if failed and error is None:
            from ..errors import VitlabError
            raise VitlabError(f"rank 0 stopped (its message says why); rank {rt.rank} stops with it")
    if error is not None:
        raise error
    return result


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        import torch.distributed as dist
        dist.barrier()
