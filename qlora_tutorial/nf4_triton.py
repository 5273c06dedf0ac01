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

``dequantize_nf4`` is a PyTorch custom operator (``torch.ops.qlora_tutorial.dequantize_nf4``): on
CUDA it runs the Triton kernel, elsewhere the same arithmetic in plain PyTorch (``dequantize_torch``).
``torch.compile`` treats it as one opaque call, and a CUDA graph records its launch. The 4-bit matmul
(``fast.nf4_linear``) reaches it through ``dequantize_for_matmul``.

Triton is imported only when the kernel is first needed, so the package imports without it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

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


def dequantize_triton(packed, absmax, code, absmax2, code2, offset, blocksize: int, blocksize2: int,
                      shape, dtype: torch.dtype, *, out: Optional[torch.Tensor] = None,
                      bytes_per_program: int = DEFAULT_BYTES, num_warps: int = DEFAULT_WARPS) -> torch.Tensor:
    """Launch the Triton kernel (CUDA tensors, or any device under ``TRITON_INTERPRET=1``).

    Each program handles ``bytes_per_program`` packed bytes (rounded to whole quantization blocks, at
    least one).
    """
    n_out = 1
    for s in shape:
        n_out *= int(s)
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    n_bytes = (n_out + 1) // 2
    nested = absmax2 is not None
    blocks = max(1, bytes_per_program // (blocksize // 2))  # quantization blocks per program
    grid = (triton_cdiv(triton_cdiv(n_bytes, blocksize // 2), blocks),)
    _kernel()[grid](packed, absmax, code, absmax2 if nested else absmax, code2 if nested else code,
                    offset if nested else absmax, out, n_bytes, n_out,
                    BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCKS=blocks,
                    num_warps=num_warps, enable_fp_fusion=False)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequantize_torch(packed, absmax, code, absmax2, code2, offset, blocksize: int, blocksize2: int,
                     shape, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's arithmetic in plain PyTorch (any device): the reference the kernel is tested against."""
    n = 1
    for s in shape:
        n *= int(s)
    if absmax2 is not None:  # double quantization: two float32 roundings, as bitsandbytes does
        blocks = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        absmax = code2[absmax.long()] * absmax2[blocks]
        absmax = absmax + offset
    flat = packed.reshape(-1)
    index = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (code[index] * scale).to(dtype).reshape(tuple(shape))


# ------------------------------------------------------------------ the custom operators
def _dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                blocksize: int, blocksize2: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) weight in ``dtype`` from bitsandbytes' packed 4-bit bytes and statistics.

    ``absmax2``, ``code2`` and ``offset`` are the double-quantization state (``None`` without it).
    On CUDA with Triton: the Triton kernel; otherwise ``dequantize_torch``.
    """
    if packed.is_cuda and triton_available():
        return dequantize_triton(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                                 (rows, cols), dtype)
    return dequantize_torch(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, (rows, cols), dtype)


def _fake(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, rows, cols, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


# The same operator under two names. The 4-bit matmul dequantizes the weight in the forward and again in
# the backward; under torch.compile two calls with the same arguments would be merged into one (common
# subexpression elimination), and the dense weight, the forward's result, would then be kept alive until
# the backward: a full 16-bit copy of every weight, the memory QLoRA exists to avoid. The backward calls
# ``dequantize_nf4_recompute``, which the compiler cannot merge with the forward's call.
dequantize_nf4 = torch.library.custom_op("qlora_tutorial::dequantize_nf4", mutates_args=())(_dequantize)
dequantize_nf4_recompute = torch.library.custom_op("qlora_tutorial::dequantize_nf4_recompute",
                                                   mutates_args=())(_dequantize)
dequantize_nf4.register_fake(_fake)
dequantize_nf4_recompute.register_fake(_fake)


def dequantize_for_matmul(packed, absmax, code, absmax2, code2, offset, blocksize: int, blocksize2: int,
                          rows: int, cols: int, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
    """The dense weight for one 4-bit matmul, by the cheapest route that is right where it runs.

    Under ``torch.compile``: the custom operator (``dequantize_nf4_recompute`` in the ``backward``), one
    opaque call in the graph. In eager mode on CUDA: the Triton kernel launched directly, without the
    operator's Python dispatch, which costs tens of microseconds per call (more than the kernel takes
    for most of a model's layers, and paid twice per layer per step). Elsewhere: ``dequantize_torch``.
    """
    if torch.compiler.is_compiling():
        op = dequantize_nf4_recompute if backward else dequantize_nf4
        return op(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, rows, cols, dtype)
    return _dequantize(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, rows, cols, dtype)


def state_args(quant_state) -> tuple:
    """The tensors and sizes of a bitsandbytes ``QuantState``, in ``dequantize_nf4``'s argument order
    (after ``packed``, before ``dtype``)."""
    rows, cols = quant_state.shape
    if quant_state.nested:
        s2 = quant_state.state2
        return (quant_state.absmax, quant_state.code, s2.absmax, s2.code, quant_state.offset,
                quant_state.blocksize, s2.blocksize, rows, cols)
    return (quant_state.absmax, quant_state.code, None, None, None, quant_state.blocksize, 256, rows, cols)


def dequantize_like_bnb(packed: torch.Tensor, quant_state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``, computed by our operator."""
    if quant_state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 handles NF4 only, this state is {quant_state.quant_type!r}")
    return dequantize_nf4(packed, *state_args(quant_state), dtype or quant_state.dtype)
