"""Our NF4 dequantization kernel (``nf4_triton``) against bitsandbytes, byte for byte.

The Triton kernel runs on CUDA, and on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``)
where Triton is installed.
"""
import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_tutorial import nf4_triton
from qlora_tutorial.nf4 import as_state, dequantize_nf4

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bitsandbytes' CPU kernel is right only for whole blocks per row (see matmul4bit): CPU shapes keep to those
SHAPES = [(96, 256), (5, 128), (1, 64)] + ([(3, 65), (7, 333), (129, 64)] if CUDA else [])


def quantized(shape, dtype, nested, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * (0.01 + seed % 3)).to(dtype).to(DEVICE)
    return bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)


@pytest.fixture
def triton_kernel(monkeypatch):
    """The Triton kernel: compiled on CUDA, interpreted on the CPU (skipped only where Triton is absent)."""
    pytest.importorskip("triton")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        nf4_triton._kernel.cache_clear()  # decorate the kernel again, now for the interpreter
    yield nf4_triton.dequantize_triton
    nf4_triton._kernel.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("nested", [False, True])
def test_triton_kernel_gives_bitsandbytes_bytes(triton_kernel, nested):
    for seed, shape in enumerate(SHAPES):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            packed, state = quantized(shape, dtype, nested, seed)
            reference = bnbF.dequantize_4bit(packed, state)
            out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # every element must be written
            # a small tile, so that these shapes span several programs and a ragged last one
            triton_kernel(packed, as_state(state), dtype, out=out, bytes_per_program=64)
            if CUDA or dtype != torch.bfloat16:
                assert torch.equal(out, reference), (shape, dtype, nested)
            else:
                # Triton's CPU interpreter emulates bf16 by truncating float32 (the GPU rounds to nearest,
                # as bitsandbytes does): compare with the float32 result truncated
                f32 = dequantize_nf4(packed, as_state(state), torch.float32)
                truncated = (f32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
                assert torch.equal(out, truncated), (shape, nested)


def test_odd_number_of_values(triton_kernel):
    """An odd count: the last byte's low nibble is padding and must not be written."""
    packed, state = bnbF.quantize_4bit(torch.randn(3, 21).to(DEVICE), blocksize=64, quant_type="nf4")
    out = torch.full((3, 21), float("nan"), device=DEVICE)
    triton_kernel(packed, as_state(state), torch.float32, out=out, bytes_per_program=16)
    assert torch.equal(out, dequantize_nf4(packed, as_state(state)))


def test_registered_as_the_cuda_backend_of_nf4_weights():
    packed, state = quantized((8, 128), torch.float32, True, 0)
    assert nf4_triton.handles(packed, as_state(state)) == (CUDA and nf4_triton.triton_available())
    _, fp4_state = bnbF.quantize_4bit(torch.randn(8, 128).to(DEVICE), quant_type="fp4")
    assert not nf4_triton.handles(packed, as_state(fp4_state))  # the kernel is written for NF4
