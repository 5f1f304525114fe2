"""What the hardware can do: device choice, whether bf16 is fast here, and a record of the machine
for benchmark and run logs."""
from __future__ import annotations

import platform
from functools import lru_cache

import torch


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
