import pytest
import torch

from qlora_tutorial.device import pick_device, seed_everything, time_matmul


def test_cpu_computes_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rt = pick_device()
    assert rt.device.type == "cpu" and rt.dtype == torch.float32


def test_cuda_dtype_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a T4
    assert pick_device().dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # Ampere and newer
    assert pick_device().dtype == torch.bfloat16


def test_prefer_cpu_even_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cpu").device.type == "cpu"


def test_bad_device_requests(monkeypatch):
    with pytest.raises(ValueError, match="use 'cpu' or 'cuda'"):
        pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        pick_device("cuda")


def test_seed_repeats():
    seed_everything(3)
    a = torch.randn(4)
    seed_everything(3)
    assert torch.equal(a, torch.randn(4))


def test_time_matmul_measures_both_dtypes():
    fp32, bf16 = time_matmul(torch.float32, size=64, repeat=3), time_matmul(torch.bfloat16, size=64, repeat=3)
    assert 0 < fp32 < 1 and 0 < bf16 < 1


def test_qlora_dtype_forces_float16_on_a_gpu(monkeypatch):
    """The T4's path (no bfloat16) on any GPU: QLORA_DTYPE=float16; other values are refused."""
    from qlora_tutorial.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("QLORA_DEVICE", raising=False)
    monkeypatch.delenv("QLORA_DTYPE", raising=False)
    assert pick_device().dtype == torch.bfloat16
    monkeypatch.setenv("QLORA_DTYPE", "float16")
    assert pick_device().dtype == torch.float16 and pick_device().device.type == "cuda"
    monkeypatch.setenv("QLORA_DTYPE", "float32")
    with pytest.raises(ValueError, match="QLORA_DTYPE='float32'"):
        pick_device()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setenv("QLORA_DTYPE", "bfloat16")
    with pytest.raises(RuntimeError, match="no bfloat16"):
        pick_device()
    monkeypatch.setenv("QLORA_DEVICE", "cpu")
    assert pick_device().dtype == torch.float32  # a CPU computes in float32 whatever QLORA_DTYPE says
