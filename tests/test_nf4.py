"""qlora_tutorial.nf4 against the real bitsandbytes (0.50.x, CPU): same bytes, same constants, same
dequantized weights; plus error bounds, packing, memory arithmetic and bad input."""
import itertools
import subprocess
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_tutorial import memory, nf4
from qlora_tutorial.nf4 import (DYNAMIC_CODE, FP4_CODE, INT4_CODE, NF4_CODE, State4bit, dequantize_nf4,
                                fake_quantize, quantize_nf4)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# bitsandbytes' pure-torch CPU fallback (odd last dimension) is wrapped in torch.compile, which compiles
# for seconds per shape and dtype; the eager function computes the same thing (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")


def make_weight(shape, dtype, scale, seed=0):
    """Gaussian weights with an outlier and (when there is room) an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    flat = w.view(-1)
    if flat.numel() > 8:
        flat[5] = 40 * scale  # outlier
    if flat.numel() >= 256:
        flat[128:192] = 0  # one all-zero block of 64
    return w.to(dtype)


def bnb_reference_dequant(packed, state):
    """bitsandbytes' own pure-torch dequantization (its 'default' backend), which indexes the
    blocks of the flattened tensor like its quantizer does."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = F.get_4bit_type(state.quant_type, device="cpu")
    return eager(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def bnb_cpu_kernel_is_flat(shape, blocksize):
    """bitsandbytes 0.50's AVX-512 dequantize kernel indexes absmax per row; that agrees with the
    flat block layout its quantizer writes only when a row is a whole number of blocks."""
    last = shape[-1] if len(shape) > 1 else shape[0]
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return not (avx512 and last % 16 == 0 and blocksize >= 16 and last % blocksize != 0)


def assert_same_state(ours: State4bit, theirs):
    assert torch.equal(ours.absmax, theirs.absmax) and ours.absmax.dtype == theirs.absmax.dtype
    assert torch.equal(ours.code, theirs.code)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.blocksize == theirs.blocksize
    assert ours.quant_type == theirs.quant_type
    assert ours.double_quant == theirs.nested
    if theirs.nested:
        assert torch.equal(ours.offset, theirs.offset)
        assert torch.equal(ours.absmax2, theirs.state2.absmax)
        assert torch.equal(ours.code2, theirs.state2.code)
        assert ours.blocksize2 == theirs.state2.blocksize


# ------------------------------------------------------------------ the codes
def test_nf4_code_is_bitsandbytes():
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7 and (NF4_CODE == 0).sum() == 1
    assert NF4_CODE.min() == -1 and NF4_CODE.max() == 1


def test_nf4_offset_is_mean_of_two_outer_quantiles():
    assert nf4.NF4_OFFSET == pytest.approx(((1 - 1 / 30) + (1 - 1 / 32)) / 2, abs=1e-7)


def test_fp4_and_dynamic_codes_are_bitsandbytes():
    assert torch.equal(FP4_CODE, F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, F.create_dynamic_map())
    assert torch.equal(INT4_CODE * 7, torch.arange(-7.0, 8.0))


# ------------------------------------------------------------------ bit-exact with bitsandbytes
SHAPES = [(1, 1), (1,), (3,), (7, 33), (64, 64), (5, 65), (2, 96), (33, 48), (1000, 13), (256, 300)]


@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_with_bitsandbytes(shape, dtype, double_quant):
    for scale in (1e-4, 1.0, 1e3):
        w = make_weight(shape, dtype, scale)
        packed, state = quantize_nf4(w, double_quant=double_quant)
        p_bnb, s_bnb = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        assert packed.dtype == torch.uint8 and packed.shape == p_bnb.shape
        assert torch.equal(packed, p_bnb)
        assert_same_state(state, s_bnb)
        ours = dequantize_nf4(packed, state)
        assert ours.dtype == w.dtype and ours.shape == w.shape
        assert torch.equal(ours, bnb_reference_dequant(p_bnb, s_bnb))
        if bnb_cpu_kernel_is_flat(shape, 64):
            assert torch.equal(ours, F.dequantize_4bit(p_bnb, s_bnb))


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bit_exact_every_blocksize(blocksize, quant_type):
    for (shape, dtype), dq in itertools.product(zip([(3, 1000), (4096,), (9, 129)], DTYPES), [False, True]):
        w = make_weight(shape, dtype, 0.02, seed=blocksize)
        packed, state = nf4._quantize(w, quant_type, blocksize, dq)
        p_bnb, s_bnb = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type=quant_type)
        assert torch.equal(packed, p_bnb)
        assert_same_state(state, s_bnb)
        assert torch.equal(dequantize_nf4(packed, state), bnb_reference_dequant(p_bnb, s_bnb))


def test_all_zero_tensor_and_tail_block():
    for shape in [(64,), (100,), (1, 1), (3, 64)]:
        w = torch.zeros(shape)
        packed, state = quantize_nf4(w, double_quant=True)
        p_bnb, s_bnb = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
        assert torch.equal(packed, p_bnb)
        assert_same_state(state, s_bnb)
        assert torch.equal(dequantize_nf4(packed, state), torch.zeros(shape))
    # a short last block keeps absmax clamped to 1e-38 (float32), a full one keeps 0, as bitsandbytes does
    _, state = quantize_nf4(torch.zeros(100))
    assert state.absmax[0] == 0 and state.absmax[1] == torch.tensor(1e-38)


def test_odd_numel_pads_with_the_code_of_zero():
    packed, _ = quantize_nf4(torch.tensor([1.0, -1.0, 0.5]))
    zero_index = int(torch.nonzero(NF4_CODE == 0))
    assert packed.reshape(-1)[-1].item() & 0x0F == zero_index


def test_high_nibble_first():
    # NF4 indices are sorted: -1 -> 0, 1 -> 15, 0 -> 7
    packed, _ = quantize_nf4(torch.tensor([-1.0, 1.0, 0.0, 1.0]))
    assert packed.reshape(-1).tolist() == [0x0F, 0x7F]


def test_many_chunks_are_bit_exact():
    w = make_weight((3 * nf4.CHUNK // 1000 + 1, 1000), torch.float32, 0.02)  # crosses chunks, ends in a short block
    packed, state = quantize_nf4(w, double_quant=True)
    p_bnb, s_bnb = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, p_bnb)
    assert_same_state(state, s_bnb)
    assert torch.equal(dequantize_nf4(packed, state), F.dequantize_4bit(p_bnb, s_bnb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 256), (7, 45)])  # whole blocks; a short last block and an odd count
def test_chunked_dequantize_equals_the_oneshot_teaching_copy(dtype, shape):
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = quantize_nf4(weight)
    oneshot = nf4.dequantize_4bit_oneshot(packed, state.absmax, state.code, 64, shape, dtype)
    assert oneshot.dtype == dtype and oneshot.shape == weight.shape
    assert torch.equal(oneshot, dequantize_nf4(packed, state))
    chunked = nf4.dequantize_4bit(packed, state.absmax, state.code, 64, shape, dtype, chunk=128)  # several chunks
    assert torch.equal(chunked, oneshot)
    if shape[1] % 64 == 0:
        assert torch.equal(oneshot, F.dequantize_4bit(packed, state.to_bnb()))
    with pytest.raises(ValueError, match="multiple of blocksize"):
        nf4.dequantize_4bit(packed, state.absmax, state.code, 64, shape, dtype, chunk=100)


# ------------------------------------------------------------------ double quantization
def test_lookup_table_path_matches_bitsandbytes_blockwise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 18, generator=g) * torch.rand(1 << 18, generator=g) ** 4  # many tiny values
    # values just around the lookup table's rounding boundaries (k - 1/2) / 65535 * 2 - 1
    edges = ((torch.arange(1, 65535, dtype=torch.float64) - 0.5) / 65535 * 2 - 1).float()
    near = torch.cat([torch.nextafter(edges, torch.tensor(-2.0)), edges, torch.nextafter(edges, torch.tensor(2.0))])
    near = torch.cat([near, torch.zeros(-near.numel() % 255)]).view(-1, 255)
    near = torch.cat([near, torch.ones(len(near), 1)], dim=1).reshape(-1)  # absmax 1 in every block
    for values in (x, near):
        codes, absmax = nf4.quantize_8bit(values, 256)
        q_bnb, s_bnb = F.quantize_blockwise(values, blocksize=256)
        assert torch.equal(codes, q_bnb) and torch.equal(absmax, s_bnb.absmax)
        assert torch.equal(nf4.dequantize_8bit(codes, absmax, 256), F.dequantize_blockwise(q_bnb, s_bnb))


def test_textbook_double_quant_is_nearest_code():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, generator=g) * torch.rand(4096, generator=g) ** 3
    codes, absmax = nf4.quantize_8bit(x, 256, lut=False)
    scaled = (x.view(-1, 256) * (1.0 / absmax).unsqueeze(1)).reshape(-1)
    distance = (scaled.unsqueeze(1) - DYNAMIC_CODE).abs()
    nearest = distance.argmin(dim=1)
    # ties aside (none here), the textbook code is the nearest one
    assert torch.equal(codes.long(), nearest)
    lut_codes, _ = nf4.quantize_8bit(x, 256, lut=True)
    assert (lut_codes != codes).any()  # the lookup table does change some codes ...
    chosen = distance.gather(1, lut_codes.long().unsqueeze(1)).squeeze(1)
    assert (chosen - distance.min(dim=1).values).max() <= 2 / 65535  # ... by less than one table step


def test_double_quant_saves_bytes_and_keeps_absmax_close():
    w = make_weight((512, 512), torch.float32, 0.02)
    _, plain = quantize_nf4(w)
    _, double = quantize_nf4(w, double_quant=True)
    assert double.absmax.dtype == torch.uint8 and double.absmax2.numel() == -(-plain.absmax.numel() // 256)
    nonzero = plain.absmax > 0  # make_weight zeroes one block
    rel = ((double.block_absmax() - plain.absmax).abs() / plain.absmax)[nonzero].max()
    assert rel < 0.05
    packed, _ = quantize_nf4(w, double_quant=True)
    assert (dequantize_nf4(packed, double).view(-1)[128:192] == 0).all()  # its codes still say 0
    constants = {name: memory.bnb_nbytes(packed, state)["total"] - packed.numel() for name, state in
                 (("plain", plain), ("double", double))}
    assert constants["double"] < constants["plain"] / 3


# ------------------------------------------------------------------ bitsandbytes can use our state
@pytest.mark.parametrize("double_quant", [False, True])
def test_to_bnb_dequantize_and_params4bit(double_quant):
    w = make_weight((96, 128), torch.float32, 0.05)
    packed, state = quantize_nf4(w, double_quant=double_quant)
    qs = state.to_bnb()
    assert isinstance(qs, F.QuantState)
    assert torch.equal(F.dequantize_4bit(packed, qs), dequantize_nf4(packed, state))
    back = State4bit.from_bnb(qs)
    assert torch.equal(dequantize_nf4(packed, back), dequantize_nf4(packed, state))

    # A Linear4bit loaded from our bytes computes exactly what one quantized by bitsandbytes computes.
    ours = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    ours.weight = bnb.nn.Params4bit.from_prequantized(packed, qs.as_dict(packed=True), device="cpu", module=ours)
    theirs = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                               compress_statistics=double_quant)
    theirs.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=double_quant, module=theirs).to("cpu")
    assert torch.equal(ours.weight.data, theirs.weight.data)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


# ------------------------------------------------------------------ properties
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 31),
       blocksize=st.sampled_from([32, 64, 128]), kind=st.sampled_from(["nf4", "fp4", "int4"]))
def test_error_is_at_most_half_the_widest_gap_per_block(n, scale, seed, blocksize, kind):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * scale
    out = fake_quantize(w, quant_type=kind, blocksize=blocksize)
    code = nf4.CODES[kind].sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(w, (0, blocks * blocksize - n)).view(blocks, blocksize)
    err = torch.nn.functional.pad((out - w).abs(), (0, blocks * blocksize - n)).view(blocks, blocksize)
    bound = padded.abs().amax(dim=1) * (half_gap + 1e-6)  # plus float32 rounding of the scaling
    assert (err.amax(dim=1) <= bound).all()


@settings(max_examples=60, deadline=None)
@given(indices=st.lists(st.integers(0, 15), min_size=1, max_size=300))
def test_pack_unpack_round_trip(indices):
    idx = torch.tensor(indices, dtype=torch.uint8)
    packed = nf4.pack_4bit(idx)
    assert packed.numel() == (len(indices) + 1) // 2
    assert torch.equal(nf4.unpack_4bit(packed, len(indices)), idx)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 31),
       dtype=st.sampled_from(DTYPES))
def test_quantizing_dequantized_weights_changes_nothing(n, scale, seed, dtype):
    w = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    packed, state = quantize_nf4(w)
    again, state2 = quantize_nf4(dequantize_nf4(packed, state).float())
    assert torch.equal(packed, again)


# ------------------------------------------------------------------ fake_quantize
def test_fake_quantize_matches_round_trips():
    w = make_weight((64, 200), torch.bfloat16, 0.02)
    for dq in (False, True):
        p, s = quantize_nf4(w, double_quant=dq)
        assert torch.equal(fake_quantize(w, "nf4", double_quant=dq), dequantize_nf4(p, s))
        p_bnb, s_bnb = F.quantize_4bit(w, compress_statistics=dq, quant_type="fp4")
        assert torch.equal(fake_quantize(w, "fp4", double_quant=dq), F.dequantize_4bit(p_bnb, s_bnb))
    out = fake_quantize(w, "int4")
    assert out.dtype == w.dtype and out.shape == w.shape
    blocks = w.float().view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    ratio = blocks * (1.0 / absmax.clamp(min=1e-38)) * 7
    level = torch.round(ratio).clamp(-7, 7).long()  # symmetric INT4: round to the nearest k/7
    expected = (INT4_CODE[level + 7] * absmax).to(w.dtype).view(w.shape)
    differ = (out != expected).view(-1, 64)
    ties = ((ratio - ratio.floor()) - 0.5).abs() < 1e-5  # torch.round goes to even, bucketize to the lower value
    assert differ.any() and not (differ & ~ties).any()


# ------------------------------------------------------------------ memory arithmetic
def test_bits_per_param():
    assert memory.bits_per_param(64) == 4.5
    assert memory.bits_per_param(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert memory.bits_per_param(64) - memory.bits_per_param(64, double_quant=True) == pytest.approx(0.373, abs=1e-3)


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 4096, 64 * 256 + 1, 100_001])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_nbytes_is_what_bitsandbytes_allocates(numel, double_quant):
    p, s = F.quantize_4bit(torch.randn(numel), compress_statistics=double_quant, quant_type="nf4")
    assert memory.quantized_nbytes(numel, 64, double_quant) == memory.bnb_nbytes(p, s)
    ours_p, ours_s = quantize_nf4(torch.randn(numel), double_quant=double_quant)
    assert memory.bnb_nbytes(ours_p, ours_s) == memory.bnb_nbytes(p, s)  # our State4bit counts the same


def test_model_weight_bytes_matches_bitsandbytes_on_a_model():
    from qlora_tutorial.models import tiny_llama

    model = tiny_llama()
    calc = memory.model_weight_bytes(model, double_quant=True)
    total_q, q_params, other = 0, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            p, s = F.quantize_4bit(module.weight.data, compress_statistics=True, quant_type="nf4")
            total_q += memory.bnb_nbytes(p, s)["total"]
            q_params += module.weight.numel()
    other = sum(p.numel() for p in model.parameters()) - q_params
    assert calc["quantized_params"] == q_params and calc["other_params"] == other
    assert calc["packed_bytes"] + calc["constant_bytes"] == total_q
    assert calc["total_bytes"] == total_q + 2 * other


# ------------------------------------------------------------------ memory use
@pytest.mark.slow
def test_quantizing_needs_less_extra_memory_than_the_weight():
    code = (
        "import resource, torch\n"
        "from qlora_tutorial.nf4 import quantize_nf4\n"
        "quantize_nf4(torch.randn(4096))\n"
        "w = torch.randn(4096, 4096)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "quantize_nf4(w, double_quant=True)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    weight_bytes = 4096 * 4096 * 4
    # the packed output alone is half the weight; bitsandbytes' own CPU path takes about 2.5 times the weight
    assert extra < 0.75 * weight_bytes, f"quantizing a {weight_bytes} B weight took {extra} B extra"


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("weight, match", [
    (torch.tensor([1.0, float("inf")]), "non-finite"),
    (torch.tensor([float("nan")] * 3), "non-finite"),
    (torch.cat([torch.zeros(100), torch.tensor([float("inf")]), torch.zeros(27)]).half(), "first in block 1;"),
    (torch.cat([torch.zeros(nf4.CHUNK + 64), torch.tensor([float("-inf")])]), f"block {nf4.CHUNK // 64 + 1}"),
    (torch.arange(10), "float32, float16 or bfloat16"),
    (torch.ones(3, dtype=torch.bool), "float32, float16 or bfloat16"),
    (torch.ones(3, dtype=torch.float64), "convert it with .float()"),
    (torch.empty(0, 5), "empty"),
])
def test_bad_weights(weight, match):
    with pytest.raises(ValueError, match=match):
        quantize_nf4(weight)
    with pytest.raises(ValueError, match=match):
        fake_quantize(weight)


@pytest.mark.parametrize("blocksize", [0, 16, 63, 100, 8192, True, 64.0])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(128), blocksize=blocksize)


def test_other_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match="quant_type must be one of"):
        fake_quantize(torch.randn(64), quant_type="int8")
    packed, state = quantize_nf4(torch.randn(100))
    with pytest.raises(ValueError, match="bytes for shape"):
        dequantize_nf4(packed[:-1], state)
