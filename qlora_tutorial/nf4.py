"""NF4 by hand, byte for byte what bitsandbytes stores.

This module holds the 4-bit codes (NF4, and FP4 and INT4 to compare it with), blockwise 4-bit
quantization with its packing, and the signed 8-bit dynamic code of double quantization. What the
results cost in bytes is counted in ``qlora_tutorial.memory``.

The recipe (QLoRA, Dettmers et al. 2023), as bitsandbytes 0.50 runs it on the CPU:

1. Cut the flattened weight into blocks of ``blocksize`` (64) consecutive values; the last block
   may be shorter. Each block keeps its absolute maximum ``absmax`` in float32.
2. Scale the block into [-1, 1]: multiply by the reciprocal 1 / absmax (the shorter last block
   is divided by its absmax instead, as bitsandbytes does), clamp to [-1, 1].
3. Give each value the index of the nearest of the 16 code values: compare with the 15 midpoints
   between neighbouring code values (a value exactly on a midpoint goes to the lower code).
4. Pack two 4-bit indices per byte, the first in the high nibble; an odd count pads the last low
   nibble with the index of 0.
5. Double quantization (optional) stores the absmax constants in 8 bits: subtract their mean,
   quantize blocks of 256 with the signed 8-bit dynamic code and a 65,536-entry lookup table.

Dequantization is ``code[index] * absmax`` in float32, cast to the weight's dtype:
``dequantize_4bit_oneshot`` writes it as three tensor operations on the whole tensor.

The package runs both directions in chunks of about two million values, so quantizing a weight
needs its output plus a few chunk-sized temporaries (8 MiB each), whatever its size: no weight-sized
copies, and never a distance from every value to every code value (n x 16 numbers), the naive way to
find the nearest. The chunk loop is a thin outer loop: each chunk runs the same few operations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts for 4-bit
BLOCKSIZE2 = 256  # block size of the second-level (double) quantization
CHUNK = 1 << 21  # values per chunk of work (8 MiB of float32): a multiple of every blocksize
NF4_OFFSET = 0.9677083  # outermost quantile: the mean of 1 - 1/(2*15) and 1 - 1/(2*16)
LUT_SIZE = 65536  # entries of bitsandbytes' CPU lookup table for 8-bit blockwise quantization


# ------------------------------------------------------------------ the 4-bit codes
def build_nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values from quantiles of the standard normal, as bitsandbytes builds them.

    Positive side: the quantiles at 8 probabilities evenly spaced from ``offset`` down to 0.5
    (exclusive); negative side: minus the quantiles at 7 such probabilities; plus an exact zero.
    That makes 8 positive, 7 negative values and a zero, scaled so the largest is 1. The
    probabilities are spaced in float32 and the quantiles taken in float64, then rounded to float32.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def build_fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 code, indexed by bit pattern: 1 sign, 2 exponent, 1 mantissa bit.

    For exponent field E (0..3) and mantissa bit m the magnitude is (1 + m/2) * 2^(4 - E) when
    E > 0 and m / 16 (a subnormal) when E = 0; the sign bit is the top bit of the 4-bit index.
    Magnitudes {0, 1/16, 2, 3, 4, 6, 8, 12} are divided by the largest, 12.
    """
    values = []
    for sign in (1.0, -1.0):
        for bits in range(8):
            exponent, mantissa = bits >> 1, bits & 1
            magnitude = (1 + mantissa / 2) * 2.0 ** (4 - exponent) if exponent else mantissa / 16
            values.append(sign * magnitude)
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.abs().max()


def build_int4_code() -> torch.Tensor:
    """Symmetric absmax INT4: the 15 values k/7 for k = -7..7 (the 16th pattern, -8, is unused)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


NF4_CODE = build_nf4_code()
FP4_CODE = build_fp4_code()
INT4_CODE = build_int4_code()
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


def build_dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 values in [-1, 1]), used for double quantization.

    A value is sign * 10^(i - 6) * f for decades i = 0..6, where the fraction f takes the 2^i
    midpoints of an even grid on [0.1, 1]: few steps near zero, fine steps near 1 (127 values per
    sign). Zero and 1.0 complete the 256.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = (10 ** (i - 6)) * means
        values += decade.tolist() + (-decade).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = build_dynamic_code()


def midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision boundaries of nearest-code rounding: ``(midpoints of the sorted code, order)``.

    ``order[k]`` is the index (bit pattern) of the k-th smallest code value; for NF4 it is 0..15.
    """
    sorted_code, order = torch.sort(code, stable=True)
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order


# ------------------------------------------------------------------ packing
def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble; an odd count is padded with 0.

    Returns a flat uint8 tensor of ceil(n / 2) bytes (``quantize_4bit`` pads with the index of 0
    itself, so it packs even-length chunks only).
    """
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    return (flat[0::2] << 4) | flat[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit indices of ``packed`` (uint8), high nibble first."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n]


# ------------------------------------------------------------------ input checks
def check_weight(weight, what: str = "weight") -> None:
    """What bitsandbytes' 4-bit quantizer accepts: a non-empty float32/float16/bfloat16 tensor.

    Non-finite values are caught blockwise while quantizing (an inf or nan makes its block's absmax
    non-finite), so this check costs no extra pass over the data.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{what} must be float32, float16 or bfloat16 (what bitsandbytes' 4-bit quantizer takes), "
                         f"got {weight.dtype}; convert it with .float()")
    if weight.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(weight.shape)}): there is nothing to quantize")


def check_blocksize(blocksize) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (what bitsandbytes supports), got {blocksize!r}")


def _check_finite(absmax: torch.Tensor, first_block: int, what: str) -> None:
    if not torch.isfinite(absmax).all():
        bad = first_block + int(torch.nonzero(~torch.isfinite(absmax))[0])
        raise ValueError(f"{what} holds non-finite values (inf or nan), first in block {bad}; "
                         "clean them before quantizing")


# ------------------------------------------------------------------ blockwise 4-bit
@torch.no_grad()
def quantize_4bit(weight: torch.Tensor, code: torch.Tensor = NF4_CODE, blocksize: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization onto a 16-value ``code`` (NF4 by default), packed.

    Returns ``(packed, absmax)``: ``packed`` uint8 shaped (ceil(n/2), 1) as bitsandbytes lays it
    out, ``absmax`` float32 with one entry per block. Works in chunks of ``CHUNK`` values.
    """
    check_weight(weight)
    check_blocksize(blocksize)
    bounds, order = midpoints(code.to(weight.device))
    sorted_indices = not torch.equal(order, torch.arange(len(order), device=order.device))
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize  # values in complete blocks
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)

    def store(first: int, scaled: torch.Tensor) -> None:  # scaled: an even number of values in [-1, 1]
        index = torch.bucketize(scaled.reshape(-1), bounds, out_int32=True)
        if sorted_indices:
            index = order[index]
        packed[first // 2: first // 2 + index.numel() // 2] = pack_4bit(index)

    for start in range(0, full, CHUNK):
        x = flat[start:min(start + CHUNK, full)].float().view(-1, blocksize)  # float32 input: a view, no copy
        scaled = x.abs()  # one chunk-sized buffer, reused for the scaled values below
        block_max = scaled.amax(dim=1)
        _check_finite(block_max, start // blocksize, "weight")
        reciprocal = 1.0 / block_max.clamp(min=1e-38)  # an all-zero block scales to 0
        torch.mul(x, reciprocal.unsqueeze(1), out=scaled).clamp_(-1, 1)
        store(start, scaled)
        absmax[start // blocksize: start // blocksize + len(block_max)] = block_max

    if full < n:  # the shorter last block: divided, and its stored absmax clamped (bitsandbytes' way)
        x = flat[full:].float()
        block_max = x.abs().max().clamp(min=1e-38)
        _check_finite(block_max.view(1), full // blocksize, "weight")
        scaled = torch.clamp(x / block_max, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))  # pad with 0.0: its code fills the nibble
        store(full, scaled)
        absmax[-1] = block_max
    return packed.unsqueeze(1), absmax


@torch.no_grad()
def dequantize_4bit_oneshot(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                            shape, dtype: torch.dtype) -> torch.Tensor:
    """``code[index] * absmax`` over the whole tensor at once: unpack, look up, scale by the block's absmax.

    The teaching copy of dequantization (and what ``torch.compile`` fuses into one kernel); it
    needs temporaries the size of the weight. ``dequantize_4bit`` runs it chunk by chunk.
    """
    shape = torch.Size(shape)
    n = shape.numel()
    values = code.float()[unpack_4bit(packed, n).long()]
    if n % blocksize:  # the shorter last block: pad it, so that every block is one row
        values = torch.nn.functional.pad(values, (0, blocksize - n % blocksize))
    values = values.view(-1, blocksize) * absmax.float().view(-1, 1)
    return values.view(-1)[:n].to(dtype).view(shape)


@torch.no_grad()
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape, dtype: torch.dtype, chunk: int = CHUNK) -> torch.Tensor:
    """``dequantize_4bit_oneshot``, checked, in chunks of ``chunk`` values (a multiple of ``blocksize``)."""
    check_blocksize(blocksize)
    if chunk <= 0 or chunk % blocksize:
        raise ValueError(f"chunk must be a positive multiple of blocksize {blocksize}, got {chunk}")
    shape = torch.Size(shape)
    n = shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with ceil({n}/2) = {(n + 1) // 2} bytes for shape {tuple(shape)}, "
                         f"got {packed.dtype} with {packed.numel()}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {-(-n // blocksize)} "
                         f"blocks of {blocksize} for shape {tuple(shape)}")
    code = code.to(packed.device)
    flat_packed = packed.reshape(-1)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    for start in range(0, n, chunk):  # chunks start on a block boundary and an even value
        stop = min(start + chunk, n)
        out[start:stop] = dequantize_4bit_oneshot(flat_packed[start // 2: (stop + 1) // 2],
                                                  absmax[start // blocksize: -(-stop // blocksize)],
                                                  code, blocksize, (stop - start,), dtype)
    return out.view(shape)


# ------------------------------------------------------------------ 8-bit dynamic (double quantization)
def build_lookup_table(code: torch.Tensor = DYNAMIC_CODE) -> torch.Tensor:
    """bitsandbytes' CPU shortcut for nearest-code search in a 256-value code.

    [-1, 1] is cut into 65,536 evenly spaced points -1 + 2i/65535; entry i is the index of the
    code value nearest to point i (the number of midpoints below it). A value is then looked up
    at the nearest point instead of searched in the code.
    """
    points = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    bounds, _ = midpoints(code)
    return torch.bucketize(points, bounds).to(torch.uint8)


DYNAMIC_LUT = build_lookup_table()


@torch.no_grad()
def quantize_8bit(x: torch.Tensor, blocksize: int = BLOCKSIZE2, code: torch.Tensor = DYNAMIC_CODE,
                  lut: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a float32 vector onto a 256-value code.

    ``lut=True`` reproduces bitsandbytes' CPU kernel: value v in [-1, 1] goes to table entry
    floor((v + 1) / 2 * 65535 + 0.5), i.e. to the nearest of 65,536 grid points first.
    ``lut=False`` is the textbook rule: the nearest code value (midpoint search).
    An all-zero block gets code 0 in both, as the CPU kernel writes. Returns ``(codes uint8, absmax)``.
    """
    x = x.reshape(-1).float()
    n = x.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    zero = absmax == 0
    scaled = padded * torch.where(zero, 0.0, 1.0 / absmax).unsqueeze(1)
    # A subnormal absmax has an infinite reciprocal: values go to +-inf (clamped to +-1, as in
    # bitsandbytes), and the zeros that pad the last block to 0 * inf = NaN, which would index nothing.
    scaled.nan_to_num_(nan=0.0).clamp_(-1, 1)
    if lut:
        table = DYNAMIC_LUT if code is DYNAMIC_CODE else build_lookup_table(code)
        point = (((scaled + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).long()  # float -> int truncates, like the C cast
        codes = table.to(x.device)[point]
    else:
        codes = torch.bucketize(scaled, midpoints(code.to(x.device))[0]).to(torch.uint8)
    codes[zero] = 0
    return codes.reshape(-1)[:n], absmax


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = BLOCKSIZE2,
                    code: torch.Tensor = DYNAMIC_CODE) -> torch.Tensor:
    """``code[codes] * absmax`` per block, float32."""
    n = codes.numel()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return code.to(codes.device)[codes.reshape(-1).long()] * scale


@torch.no_grad()
def double_quantize(absmax: torch.Tensor, blocksize2: int = BLOCKSIZE2, lut: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the float32 absmax constants themselves: ``(codes uint8, offset, absmax2)``.

    The constants are all positive, so their mean ``offset`` is subtracted first (centring them
    uses the signed code's both halves), then blocks of ``blocksize2`` go to 8 bits.
    """
    offset = absmax.mean()
    if not torch.isfinite(offset):
        # The float32 sum of the constants overflows once they come near float32's limit (3.4e38).
        # bitsandbytes then stores an infinite offset and dequantizes every weight to NaN.
        raise ValueError(f"double quantization overflows: the mean of the block absmax constants (the largest is "
                         f"{absmax.max().item():.3g}) is not finite in float32, so the weights would come back "
                         "as NaN. Quantize these weights without double quantization (double_quant=False), "
                         "or scale them down first")
    codes, absmax2 = quantize_8bit(absmax - offset, blocksize2, lut=lut)
    return codes, offset, absmax2


def double_dequantize(codes: torch.Tensor, offset: torch.Tensor, absmax2: torch.Tensor,
                      blocksize2: int = BLOCKSIZE2) -> torch.Tensor:
    """The float32 absmax constants back: ``dequantize_8bit(codes, absmax2) + offset``."""
    return dequantize_8bit(codes, absmax2, blocksize2) + offset


# ------------------------------------------------------------------ the NF4 API
@dataclass
class State4bit:
    """What it takes to dequantize a packed 4-bit weight (bitsandbytes calls it ``QuantState``).

    ``absmax`` holds one float32 per block, or, with double quantization, one uint8 code per block
    together with ``offset`` (their mean), ``absmax2`` (one float32 per 256 blocks) and ``code2``.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor = None
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = BLOCKSIZE2

    def __post_init__(self):
        if self.code is None:
            self.code = CODES[self.quant_type].to(self.absmax.device)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by name (what it stores beside the packed bytes)."""
        names = ("absmax", "code") + (("absmax2", "offset", "code2") if self.double_quant else ())
        return {name: getattr(self, name) for name in names}

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (decoded first when double-quantized)."""
        if self.double_quant:
            return double_dequantize(self.absmax, self.offset, self.absmax2, self.blocksize2)
        return self.absmax

    def to_bnb(self):
        """The same state as a ``bitsandbytes.functional.QuantState`` (tensors shared, not copied)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype, offset=self.offset, state2=state2)

    @classmethod
    def from_bnb(cls, state) -> "State4bit":
        """Ours from a bitsandbytes ``QuantState`` (tensors shared, not copied)."""
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU eval path (AVX512-BF16) repacks the bytes into another layout, which the
            # package does not read; Qlora_4_bit turns that path off
            raise ValueError("this 4-bit weight was repacked by bitsandbytes' CPU eval path (packing_format_for_cpu); "
                             "dequantize it with bitsandbytes.functional.dequantize_4bit instead")
        double_quant = state.state2 is not None  # bitsandbytes calls it ``nested``
        return cls(absmax=state.absmax, shape=torch.Size(state.shape), dtype=state.dtype, blocksize=state.blocksize,
                   quant_type=state.quant_type, code=state.code, offset=state.offset if double_quant else None,
                   absmax2=state.state2.absmax if double_quant else None,
                   code2=state.state2.code if double_quant else None,
                   blocksize2=state.state2.blocksize if double_quant else BLOCKSIZE2)


def as_state(quant_state) -> State4bit:
    """Ours from either a ``State4bit`` or a bitsandbytes ``QuantState`` (tensors shared, not copied)."""
    if isinstance(quant_state, State4bit):
        return quant_state
    if quant_state is None or not hasattr(quant_state, "absmax"):
        raise TypeError("quant_state must be a qlora_tutorial.nf4.State4bit or a bitsandbytes QuantState "
                        f"(e.g. layer.weight.quant_state), got {type(quant_state).__name__}")
    return State4bit.from_bnb(quant_state)

def _quantize(weight, quant_type: str, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, State4bit]:
    check_weight(weight)
    packed, absmax = quantize_4bit(weight, CODES[quant_type].to(weight.device), blocksize)
    state = State4bit(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                      quant_type=quant_type)
    if double_quant:
        state.absmax, state.offset, state.absmax2 = double_quantize(absmax)
        state.code2 = DYNAMIC_CODE.to(weight.device)
    return packed, state


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False
                 ) -> tuple[torch.Tensor, State4bit]:
    """NF4-quantize ``weight``: ``(packed, state)``, equal to
    ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` on the CPU, byte for byte."""
    return _quantize(weight, "nf4", blocksize, double_quant)


def dequantize_nf4(packed: torch.Tensor, state: State4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back from ``quantize_nf4`` (or from any 4-bit ``State4bit``: its code says which):
    the input's shape, in ``dtype`` (default: the input's dtype).

    The book's readable dequantization, and one of the backends of the 4-bit matmul
    (``matmul4bit.pick_backend``).
    """
    return dequantize_4bit(packed, state.block_absmax(), state.code, state.blocksize, state.shape,
                           dtype or state.dtype)


def fake_quantize(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
                  ) -> torch.Tensor:
    """The quantize -> dequantize round trip of ``weight`` (same shape and dtype).

    ``quant_type`` is "nf4", "fp4" (bitsandbytes' FP4) or "int4" (symmetric absmax, k/7 for
    k = -7..7); all three use blockwise absmax with ``blocksize`` and, optionally, double quantization.
    """
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be one of {sorted(CODES)}, got {quant_type!r}")
    check_weight(weight)
    code = CODES[quant_type].to(weight.device)
    packed, absmax = quantize_4bit(weight, code, blocksize)
    if double_quant:
        absmax = double_dequantize(*double_quantize(absmax))
    return dequantize_4bit(packed, absmax, code, blocksize, weight.shape, weight.dtype)
