"""Number formats and absmax quantization: the basics that NF4 builds on.

Three things live here, each a few tensor operations you can read off the math:

* ``float_format``: the range and precision of fp32, bf16 and fp16, computed from their exponent
  and mantissa bit counts (the chapter checks them against ``torch.finfo``);
* absmax int8 quantization, symmetric (``absmax_quantize``) and with a zero point
  (``zeropoint_quantize``), for a whole tensor;
* blockwise absmax int8 (``blockwise_quantize``): one scale per block of ``blocksize`` consecutive
  values of the flattened tensor, the layout bitsandbytes uses for 8-bit and 4-bit weights.
"""
from __future__ import annotations

import math

import torch

# (exponent bits, mantissa bits) of the three floating-point formats the book uses.
FLOAT_BITS = {torch.float32: (8, 23), torch.bfloat16: (8, 7), torch.float16: (5, 10)}


def float_format(dtype: torch.dtype) -> dict:
    """Range and precision of an IEEE-style binary float, computed from its bit counts.

    With e exponent bits and m mantissa bits the exponent bias is 2^(e-1) - 1, so
    the largest finite value is (2 - 2^-m) * 2^bias, the smallest normal 2^(1 - bias), the smallest
    subnormal 2^(1 - bias - m), and the gap between 1 and the next value (machine epsilon) 2^-m.
    """
    if dtype not in FLOAT_BITS:
        raise ValueError(f"float_format knows {[str(d) for d in FLOAT_BITS]}, got {dtype}")
    e, m = FLOAT_BITS[dtype]
    bias = 2 ** (e - 1) - 1
    return {
        "bits": 1 + e + m,
        "exponent_bits": e,
        "mantissa_bits": m,
        "max": (2 - 2.0 ** -m) * 2.0 ** bias,
        "min_normal": 2.0 ** (1 - bias),
        "min_subnormal": 2.0 ** (1 - bias - m),
        "eps": 2.0 ** -m,
        "decimal_digits": m * math.log10(2),
    }


def check_float_tensor(x, what: str = "tensor") -> None:
    """Raise a clear error for what no quantizer here can take: non-tensors, non-floats, empty or
    non-finite tensors."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}; convert it with .float()")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}): there is nothing to quantize")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds non-finite values (inf or nan); clean them before quantizing")


def _qmax(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


# ------------------------------------------------------------------ one scale for the whole tensor
@torch.no_grad()
def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization: q = round(x * qmax / max|x|), qmax = 127 for 8 bits.

    Returns ``(q, absmax)`` with q an int8 tensor shaped like x. Zero maps exactly to 0, and the
    range [-absmax, absmax] is spread over the 2 * qmax + 1 integers -qmax..qmax.
    """
    check_float_tensor(x, "x")
    qmax = _qmax(bits)
    absmax = x.float().abs().max()
    q = torch.round(x.float() * (qmax / absmax.clamp(min=1e-38))).to(torch.int8)
    return q, absmax


def absmax_dequantize(q: torch.Tensor, absmax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Undo ``absmax_quantize``: x ~ q * absmax / qmax (float32)."""
    return q.float() * (absmax / _qmax(bits))


@torch.no_grad()
def zeropoint_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (zero-point) quantization onto all 2^bits integers -2^(bits-1)..2^(bits-1)-1.

    scale = (2^bits - 1) / (max - min), zero_point = round(-min * scale) - 2^(bits-1), and
    q = clamp(round(x * scale) + zero_point). Returns ``(q, scale, zero_point)``. It uses the whole
    integer range even when x is lopsided (all positive, say), which symmetric absmax does not.
    """
    check_float_tensor(x, "x")
    _qmax(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = x.float()
    scale = (hi - lo) / (x.max() - x.min()).clamp(min=1e-38)
    zero_point = torch.round(-x.min() * scale) + lo
    q = torch.clamp(torch.round(x * scale) + zero_point, lo, hi).to(torch.int8)
    return q, scale, zero_point


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Undo ``zeropoint_quantize``: x ~ (q - zero_point) / scale (float32)."""
    return (q.float() - zero_point) / scale


# ------------------------------------------------------------------ one scale per block
def _check_blocksize(blocksize) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")


@torch.no_grad()
def blockwise_quantize(x: torch.Tensor, blocksize: int = 64, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization with one scale per block of ``blocksize`` consecutive values.

    The tensor is flattened (row-major) and cut into blocks; the last block may be shorter. An
    outlier now only coarsens the grid of its own block. Returns ``(q, absmax)``: q int8 shaped
    like x, absmax float32 with one entry per block.
    """
    check_float_tensor(x, "x")
    _check_blocksize(blocksize)
    qmax = _qmax(bits)
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # zero padding never changes a block's absmax
    q = torch.round(padded * (qmax / absmax.clamp(min=1e-38)).unsqueeze(1)).to(torch.int8)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def blockwise_dequantize(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = 64, bits: int = 8,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo ``blockwise_quantize``: each value times its block's absmax / qmax."""
    _check_blocksize(blocksize)
    qmax = _qmax(bits)
    n = q.numel()
    scale = (absmax.float() / qmax).repeat_interleave(blocksize)[:n]
    return (q.reshape(-1).float() * scale).reshape(q.shape).to(dtype)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference, computed in float64 so small errors are not lost in rounding."""
    return torch.mean((a.double() - b.double()) ** 2).item()
