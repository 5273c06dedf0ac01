"""NF4 dequantization written from scratch as one Triton kernel, byte for byte what bitsandbytes gives.

bitsandbytes stores a 4-bit weight as packed bytes (two code indices per byte, the first value in
the high nibble) and one scale ``absmax`` per block of ``blocksize`` (64) values. With double
quantization the scales themselves are stored in 8 bits: ``absmax = code2[q] * absmax2[b // 256] +
offset``. Dequantization is then

    w[i] = code[index[i]] * absmax[i // blocksize]       (in float32, then rounded to bf16/fp16/fp32)

It reads half a byte per value and writes two (bf16): a pure memory-bound kernel. One program here
handles ``BLOCKS`` whole quantization blocks: it computes each block's scale once from the (8-bit or
float32) statistics, right in the kernel (no separate pass over the absmax constants, as bitsandbytes
makes for double quantization), loads the packed bytes in one coalesced read, splits the nibbles, looks
both values up in the 16-entry code (which stays in the L1 cache), scales them, and writes the results
interleaved, in one coalesced write.

Rounding is bitsandbytes': the product in float32, rounded once to the output dtype. The two
float32 steps of double quantization (a product, then ``+ offset``) stay two roundings: the kernel is
compiled with ``enable_fp_fusion=False``, so they are not fused into one multiply-add.

``dequantize_triton`` launches the kernel for a packed weight and its ``State4bit``. Importing this
module registers it as the ``"triton"`` backend of the 4-bit matmul (``matmul4bit.register_backend``),
preferred for NF4 weights on CUDA when Triton is installed: ``Qlora_4_bit`` then dequantizes with it
in every forward and backward pass, eager, compiled (inside the matmul's custom operator) and recorded
as a CUDA graph. ``qlora_tutorial.fast`` imports it.

Triton is imported only when the kernel is first needed, so the package imports without it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .matmul4bit import Backend, register_backend
from .nf4 import State4bit

# packed bytes per program (4,096 values, 64 blocks of 64) and warps: the fastest double-quantized tile
# measured on an H200 (book/data/gpu_kernels.json; the differences between tiles are near the noise
# between runs)
DEFAULT_BYTES = 2048
DEFAULT_WARPS = 8


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported (the GPU image has it; a CPU-only install need not)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a Triton that fails to load its backend
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernel():
    """Build the Triton kernel on first use (imports Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                              n_bytes, n_out,
                              BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                              BLOCKS: tl.constexpr):
        HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per quantization block
        pid = tl.program_id(0).to(tl.int64)
        block = pid * BLOCKS + tl.arange(0, BLOCKS)  # the quantization blocks of this program
        block_ok = block * HALF < n_bytes
        # one scale per block, computed once (not once per byte)
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=block_ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=block_ok, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=block_ok, other=0.0)
        offs = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (BLOCKS, HALF) packed bytes
        byte = tl.load(packed_ptr + offs, mask=offs < n_bytes, other=0).to(tl.int32)
        high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]  # the first value of each pair
        low = tl.load(code_ptr + (byte & 0xF)) * scale[:, None]
        values = tl.reshape(tl.join(high, low), (BLOCKS * BLOCKSIZE,))  # h0 l0 h1 l1 ...: memory order
        out_offs = pid * (BLOCKS * BLOCKSIZE) + tl.arange(0, BLOCKS * BLOCKSIZE)
        tl.store(out_ptr + out_offs, values.to(out_ptr.dtype.element_ty), mask=out_offs < n_out)

    return nf4_dequantize_kernel


def dequantize_triton(packed: torch.Tensor, state: State4bit, dtype: Optional[torch.dtype] = None, *,
                      out: Optional[torch.Tensor] = None, bytes_per_program: int = DEFAULT_BYTES,
                      num_warps: int = DEFAULT_WARPS) -> torch.Tensor:
    """Launch the Triton kernel (CUDA tensors, or any device under ``TRITON_INTERPRET=1``): the weight
    of ``packed`` and ``state`` in ``dtype`` (default: the dtype it was quantized from).

    Each program handles ``bytes_per_program`` packed bytes (rounded to whole quantization blocks, at
    least one).
    """
    dtype = dtype or state.dtype
    n_out = state.shape.numel()
    if out is None:
        out = torch.empty(tuple(state.shape), dtype=dtype, device=packed.device)
    n_bytes = (n_out + 1) // 2
    blocksize = state.blocksize
    blocks = max(1, bytes_per_program // (blocksize // 2))  # quantization blocks per program
    grid = (triton_cdiv(triton_cdiv(n_bytes, blocksize // 2), blocks),)
    nested = state.double_quant  # the kernel needs some pointer for the double-quantization arguments
    _kernel()[grid](packed, state.absmax, state.code, state.absmax2 if nested else state.absmax,
                    state.code2 if nested else state.code, state.offset if nested else state.absmax, out,
                    n_bytes, n_out, BLOCKSIZE=blocksize, BLOCKSIZE2=state.blocksize2, NESTED=nested, BLOCKS=blocks,
                    num_warps=num_warps, enable_fp_fusion=False)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def handles(packed: torch.Tensor, state: State4bit) -> bool:
    """The weights the kernel dequantizes for the 4-bit matmul: NF4, on CUDA, with Triton installed."""
    return packed.is_cuda and state.quant_type == "nf4" and triton_available()


TRITON = Backend("triton", dequantize_triton, handles)
register_backend(TRITON)
