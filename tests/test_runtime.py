import torch

from vitlab.engine.runtime import describe_machine, fast_bf16_available


def test_fast_bf16_follows_the_cpu_flags():
    expected = bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    assert fast_bf16_available("cpu") is expected
    assert fast_bf16_available("mps") is False
    if not torch.cuda.is_available():
        assert fast_bf16_available("cuda") is False


def test_machine_record():
    info = describe_machine()
    assert info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert isinstance(info["cpu"], str) and info["cpu"]
