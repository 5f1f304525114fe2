"""The runtime record against facts set or read here: CPU flags and CUDA availability are
monkeypatched, the machine description is checked against /proc/cpuinfo and package metadata."""
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from vitlab.engine.runtime import Runtime, describe_machine, fast_bf16_available, resolve_precision, setup_runtime
from vitlab.errors import ConfigError

CPU = torch.device("cpu")


def cpu_flags(monkeypatch, amx: bool, avx512bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512bf16)


def cuda(monkeypatch, available: bool, bf16: bool = False) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize("amx, avx512bf16, fast", [(True, False, True), (False, True, True), (True, True, True),
                                                   (False, False, False)])
def test_auto_precision_on_cpu_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, amx, avx512bf16, fast):
    cpu_flags(monkeypatch, amx, avx512bf16)
    cuda(monkeypatch, False)
    assert fast_bf16_available("cpu") is fast
    assert resolve_precision("auto", CPU) == ("bf16" if fast else "fp32")
    assert setup_runtime("cpu").precision == ("bf16" if fast else "fp32")
    assert setup_runtime("auto") == Runtime(CPU, "bf16" if fast else "fp32")  # no CUDA: the CPU
    assert describe_machine()["fast_bf16_cpu"] is fast
    assert fast_bf16_available("mps") is False


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch, bf16, expected):
    cuda(monkeypatch, True, bf16)
    cpu_flags(monkeypatch, not bf16, not bf16)  # the CPU's flags must not decide for the GPU
    assert fast_bf16_available("cuda") is bf16
    assert resolve_precision("auto", torch.device("cuda:0")) == expected
    cuda(monkeypatch, False, bf16)
    assert fast_bf16_available("cuda") is False


def test_explicit_precisions(monkeypatch):
    cpu_flags(monkeypatch, False, False)
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # asked for: kept, even where it is emulated
    assert resolve_precision("fp16", torch.device("cuda:0")) == "fp16"
    with pytest.raises(ConfigError, match=r"runtime.precision='fp16' needs a CUDA device \(device is cpu\)"):
        resolve_precision("fp16", CPU)
    for bad in ("half", "FP32", ""):
        with pytest.raises(ConfigError, match=f"runtime.precision={bad!r} must be one of"):
            resolve_precision(bad, CPU)


def test_devices(monkeypatch):
    cuda(monkeypatch, False)
    for env in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(env, raising=False)
    assert setup_runtime("cpu", "fp32") == Runtime(CPU, "fp32", 0, 1, 0)
    with pytest.raises(ConfigError, match="runtime.device='cuda' but CUDA is not available"):
        setup_runtime("cuda")
    with pytest.raises(ConfigError, match="runtime.device='gpu0' is not a device"):
        setup_runtime("gpu0")


def test_threads_setting_is_applied():
    before = torch.get_num_threads()
    try:
        setup_runtime("cpu", "fp32", threads=1)
        assert torch.get_num_threads() == 1
        assert describe_machine()["threads"] == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_runs_matmuls_at_the_chosen_precision(precision, dtype):
    a = torch.randn(4, 4)
    with Runtime(CPU, precision).autocast():
        assert (a @ a).dtype == dtype


def test_machine_record(monkeypatch):
    cuda(monkeypatch, False)
    info = describe_machine()
    assert info["torch"].split("+")[0] == version("torch")  # the local tag (+cpu, +cu130) kept or not
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        if names:
            assert info["cpu"] == names[0]
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert "gpu" not in info


@pytest.mark.parametrize("asked", [False, True])
def test_cuda_training_keeps_cudnn_attention_off_unless_asked(monkeypatch, asked):
    """On an H100 (torch 2.11) SDPA's default, cuDNN attention, gave NaN gradients in bf16 at the
    same steps run after run, and the runs trained cleanly with it off (benchmarks/results/sweep.json).
    A CUDA runtime switches it off unless runtime.cudnn_attention; a CPU runtime leaves it alone."""
    cuda(monkeypatch, True, bf16=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(not asked)
        rt = setup_runtime("cuda", "bf16", cudnn_attention=asked)
        assert rt.device == torch.device("cuda", 0) and rt.precision == "bf16"
        assert torch.backends.cuda.cudnn_sdp_enabled() is asked
        torch.backends.cuda.enable_cudnn_sdp(True)
        cuda(monkeypatch, False)
        setup_runtime("cpu", "fp32", cudnn_attention=False)
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
