import pytest
import torch

from vitlab.engine.runtime import describe_machine, fast_bf16_available, resolve_precision
from vitlab.errors import ConfigError


@pytest.mark.parametrize("amx, avx512bf16, expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_fast_bf16_follows_the_cpu_flags(monkeypatch, amx, avx512bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512bf16)
    assert fast_bf16_available("cpu") is expected
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if expected else "fp32")
    assert fast_bf16_available("mps") is False


def test_precision_choices():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="fp16.*needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="runtime.precision='half'"):
        resolve_precision("half", torch.device("cpu"))


def test_machine_record():
    info = describe_machine()
    assert info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert isinstance(info["cpu"], str) and info["cpu"]
