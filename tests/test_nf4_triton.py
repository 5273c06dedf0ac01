"""Our NF4 dequantization (``nf4_triton``) against bitsandbytes, byte for byte.

The PyTorch version of the operator runs everywhere; the Triton kernel runs on CUDA, and on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``) where Triton is installed.
"""
import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_tutorial import nf4_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bitsandbytes' CPU kernel is right only for whole blocks per row (see layer.py): CPU shapes keep to those
SHAPES = [(96, 256), (5, 128), (1, 64)] + ([(3, 65), (7, 333), (129, 64)] if CUDA else [])


def quantized(shape, dtype, nested, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * (0.01 + seed % 3)).to(dtype).to(DEVICE)
    return bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_operator_gives_bitsandbytes_bytes(dtype, nested):
    for seed, shape in enumerate(SHAPES):
        packed, state = quantized(shape, dtype, nested, seed)
        ours = nf4_triton.dequantize_like_bnb(packed, state)
        assert ours.dtype == dtype and ours.shape == shape
        assert torch.equal(ours, bnbF.dequantize_4bit(packed, state)), (shape, dtype, nested)
        # the PyTorch version (the CPU path) too, on any device
        torch_version = nf4_triton.dequantize_torch(packed, *nf4_triton.state_args(state)[:-2], shape, dtype)
        assert torch.equal(torch_version, bnbF.dequantize_4bit(packed, state))


def test_operator_registration_and_errors():
    packed, state = quantized((8, 128), torch.float32, True, 0)
    args = (packed, *nf4_triton.state_args(state), torch.float32)
    torch.library.opcheck(torch.ops.qlora_tutorial.dequantize_nf4.default, args)
    torch.library.opcheck(torch.ops.qlora_tutorial.dequantize_nf4_recompute.default, args)
    assert torch.equal(nf4_triton.dequantize_nf4_recompute(*args), nf4_triton.dequantize_nf4(*args))
    _, fp4_state = bnbF.quantize_4bit(torch.randn(8, 128).to(DEVICE), quant_type="fp4")
    with pytest.raises(ValueError, match="NF4 only"):
        nf4_triton.dequantize_like_bnb(packed, fp4_state)


@pytest.fixture
def triton_kernel(monkeypatch):
    """The Triton kernel: compiled on CUDA, interpreted on the CPU (skipped only where Triton is absent)."""
    pytest.importorskip("triton")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        nf4_triton._kernel.cache_clear()  # decorate the kernel again, now for the interpreter
    yield nf4_triton.dequantize_triton
    nf4_triton._kernel.cache_clear()


@pytest.mark.parametrize("nested", [False, True])
def test_triton_kernel_gives_bitsandbytes_bytes(triton_kernel, nested):
    for seed, shape in enumerate(SHAPES):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            packed, state = quantized(shape, dtype, nested, seed)
            reference = bnbF.dequantize_4bit(packed, state)
            out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # every element must be written
            # a small tile, so that these shapes span several programs and a ragged last one
            triton_kernel(packed, *nf4_triton.state_args(state)[:-2], shape, dtype, out=out, bytes_per_program=64)
            if CUDA or dtype != torch.bfloat16:
                assert torch.equal(out, reference), (shape, dtype, nested)
            else:
                # Triton's CPU interpreter emulates bf16 by truncating float32 (the GPU rounds to nearest,
                # as bitsandbytes does): compare with the float32 result truncated
                f32 = nf4_triton.dequantize_torch(packed, *nf4_triton.state_args(state)[:-2], shape, torch.float32)
                truncated = (f32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
                assert torch.equal(out, truncated), (shape, nested)


def test_odd_number_of_values(triton_kernel):
    """An odd count: the last byte's low nibble is padding and must not be written."""
    packed, state = quantized((4, 64), torch.float32, False, 1)
    args = nf4_triton.state_args(state)[:-2]
    out = torch.full((3, 21), float("nan"), device=DEVICE)
    triton_kernel(packed, *args, (3, 21), torch.float32, out=out, bytes_per_program=16)
    assert torch.equal(out, nf4_triton.dequantize_torch(packed, *args, (3, 21), torch.float32))
