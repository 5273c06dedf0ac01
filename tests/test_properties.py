"""Property-based tests (hypothesis): NF4 against bitsandbytes over random shapes, dtypes, blocksizes and
value ranges (extremes included), and round trips of the layer and of adapters."""
import tempfile

import bitsandbytes.functional as F
import pytest
import torch
import torch._dynamo
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from qlora_tutorial import Qlora_4_bit, adapters, quantize_model
from qlora_tutorial import nf4
from qlora_tutorial.nf4 import (BLOCKSIZES, NF4_CODE, dequantize_nf4, midpoints,
                                quantize_nf4)

from .test_nf4 import assert_same_state, bnb_reference_dequant

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# bitsandbytes' CPU path runs torch.compile'd functions (seconds per new shape); eager gives the same.
pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")


@st.composite
def weights(draw):
    """A weight of a random shape and dtype whose values come from one of several regimes, extremes included."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.one_of(st.tuples(st.integers(1, 700)), st.tuples(st.integers(1, 5), st.integers(1, 300))))
    kind = draw(st.sampled_from(["normal", "huge", "subnormal", "ties", "equal", "zeros", "mixed"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    n = torch.Size(shape).numel()
    top = torch.finfo(dtype).max
    if kind == "normal":  # any scale the dtype holds
        w = torch.randn(n, generator=g) * 10.0 ** draw(st.floats(-30, 30))
    elif kind == "huge":  # up to the largest finite value (3.4e38 in float32 and bfloat16)
        w = (torch.rand(n, generator=g) * 2 - 1) * top
        w[draw(st.integers(0, n - 1))] = top
    elif kind == "subnormal":  # below the smallest normal number of the dtype
        w = torch.randn(n, generator=g) * torch.finfo(dtype).tiny * draw(st.sampled_from([1e-1, 1e-3, 1.0]))
    elif kind == "ties":  # values exactly halfway between two code values (after scaling by absmax = 1)
        bounds, _ = midpoints(NF4_CODE)
        w = bounds[torch.randint(0, len(bounds), (n,), generator=g)]
        w[::7] = 1.0
    elif kind == "equal":  # every value the same: each block is all-equal
        w = torch.full((n,), draw(st.sampled_from([1.0, -2.5, 3e-5, 1e30])))
    elif kind == "zeros":
        w = torch.zeros(n)
        w[: n // 3] = torch.randn(n // 3, generator=g)
    else:  # blocks of very different scales side by side
        w = torch.randn(n, generator=g) * 10.0 ** torch.randint(-20, 20, (n,), generator=g).float()
    w = w.clamp(-top, top).to(dtype).reshape(shape)
    assume(torch.isfinite(w).all())
    return w


@settings(SETTINGS, max_examples=120)
@given(w=weights(), blocksize=st.sampled_from(BLOCKSIZES), double_quant=st.booleans())
@example(w=torch.full((4, 128), 3e38), blocksize=64, double_quant=True)  # bitsandbytes: infinite offset
@example(w=torch.full((300,), 1e-40), blocksize=32, double_quant=True)  # subnormal, all-equal
@example(w=torch.cat([midpoints(NF4_CODE)[0], torch.ones(1)]), blocksize=32, double_quant=False)  # exact ties
def test_nf4_matches_bitsandbytes(w, blocksize, double_quant):
    """Same bytes, same state, same dequantized weight as bitsandbytes; where bitsandbytes' double
    quantization overflows (it would dequantize to NaN), ours raises a clear error instead."""
    packed_bnb, state_bnb = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                            quant_type="nf4")
    if double_quant and not torch.isfinite(state_bnb.offset):
        with pytest.raises(ValueError, match="double quantization overflows"):
            quantize_nf4(w, blocksize=blocksize, double_quant=True)
        return
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(packed, packed_bnb)
    assert_same_state(state, state_bnb)
    ours = dequantize_nf4(packed, state)
    theirs = bnb_reference_dequant(packed_bnb, state_bnb)
    assert ours.dtype == w.dtype and ours.shape == w.shape
    assert torch.equal(ours, theirs)


def random_linear(draw, in_features, out_features, bias, dtype=torch.float32):
    lin = nn.Linear(in_features, out_features, bias=bias)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_features, generator=g))
    return lin.to(dtype)


@settings(SETTINGS, max_examples=30)
@given(data=st.data(), in_features=st.integers(1, 200), out_features=st.integers(1, 40),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), quant_type=st.sampled_from(["nf4", "fp4"]),
       bias=st.booleans(), require_lora=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_layer_is_exact_and_round_trips(data, in_features, out_features, blocksize, double_quant, quant_type, bias,
                                        require_lora, dtype):
    """For any shape (rows that split a block included): the base is exactly our NF4/FP4 dequantization,
    the forward is that dense matmul plus LoRA, and state_dict -> load_state_dict(strict=True) into a
    freshly built layer is bit-exact."""
    lin = random_linear(data.draw, in_features, out_features, bias, dtype)
    kwargs = dict(blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type,
                  compute_dtype=torch.float32, require_lora=require_lora)
    layer = Qlora_4_bit.from_linear(lin, alpha=4, r=2, **kwargs)
    if require_lora:
        with torch.no_grad():
            layer.W_b.normal_()
    # nf4._quantize is what quantize_nf4 calls, for either 4-bit code
    packed, state = nf4._quantize(lin.weight.detach(), quant_type, blocksize, double_quant)
    exact = dequantize_nf4(packed, state)
    assert torch.equal(layer.quant_nn.weight.data, packed)
    assert torch.equal(layer.base_weight(), exact)

    x = torch.randn(3, in_features)
    expected = x @ exact.float().T + (lin.bias.float() if bias else 0)
    if require_lora:
        expected = expected + layer.scale * (x @ layer.W_a) @ layer.W_b
    # bitsandbytes' CPU forward of a 16-bit weight is not a float32 matmul of the dequantized weight:
    # measured differences reach the storage dtype's rounding (3e-3 for bfloat16 at |y| ~ 1), so the
    # bound there is that dtype's precision; float32 weights are held to 1e-4.
    tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(layer(x), expected, rtol=tol, atol=tol * (1 + expected.abs().max().item()))

    fresh = Qlora_4_bit(in_features, out_features, alpha=4, r=2, bias=bias, dtype=dtype, **kwargs)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    a, b = layer.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(fresh(x), layer(x))


class TwoLayers(nn.Module):
    def __init__(self, sizes, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(sizes[0], sizes[1])
        self.down = nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@settings(SETTINGS, max_examples=10)
@given(sizes=st.tuples(st.integers(1, 150), st.integers(1, 150), st.integers(1, 150)), r=st.integers(1, 6),
       alpha=st.one_of(st.integers(1, 64), st.floats(0.01, 100)), rslora=st.booleans(), use_qlora=st.booleans(),
       seed=st.integers(0, 1000))
def test_adapter_round_trips(sizes, r, alpha, rslora, use_qlora, seed):
    """save_adapter -> load_adapter and export_peft -> import_peft give back the same matrices, to the bit."""
    model = quantize_model(TwoLayers(sizes, seed), ["up", "down"], alpha=alpha, r=r, use_qlora=use_qlora,
                           rslora=rslora)
    with torch.no_grad():
        for p in (model.up.W_b, model.down.W_b):
            p.normal_()
    x = torch.randn(2, sizes[0])
    with tempfile.TemporaryDirectory() as folder:
        adapters.save_adapter(model, f"{folder}/ours")
        adapters.export_peft(model, f"{folder}/peft")
        for back in (adapters.load_adapter(TwoLayers(sizes, seed), f"{folder}/ours"),
                     adapters.import_peft(TwoLayers(sizes, seed), f"{folder}/peft", use_qlora=use_qlora)):
            for name in ("up", "down"):
                ours, theirs = getattr(model, name), getattr(back, name)
                assert torch.equal(ours.W_a, theirs.W_a) and torch.equal(ours.W_b, theirs.W_b)
                assert ours.scale == theirs.scale
            assert torch.equal(back(x), model(x))
