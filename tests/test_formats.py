"""qlora_tutorial.formats: float formats against torch.finfo, absmax int8 error bounds, bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_tutorial.formats import (absmax_dequantize, absmax_quantize, blockwise_dequantize, blockwise_quantize,
                                  float_format, mse, zeropoint_dequantize, zeropoint_quantize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_float_format_matches_finfo(dtype):
    f, info = float_format(dtype), torch.finfo(dtype)
    assert f["bits"] == info.bits
    assert f["max"] == info.max
    assert f["min_normal"] == info.tiny
    assert f["min_subnormal"] == info.smallest_normal * info.eps  # 2^(1-bias) * 2^-m
    assert f["eps"] == info.eps
    # the formulas name real values: max is representable, 2 * max overflows, 1 + eps/2 rounds to 1
    assert torch.tensor(f["max"], dtype=dtype).item() == f["max"]
    assert torch.isinf(torch.tensor(f["max"], dtype=dtype) * 2)
    assert torch.tensor(1 + f["eps"] / 2, dtype=dtype).item() == 1.0
    assert torch.tensor(f["min_subnormal"], dtype=dtype).item() > 0


def test_float_format_unknown_dtype():
    with pytest.raises(ValueError, match="float_format knows"):
        float_format(torch.float64)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 500), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 31))
def test_absmax_int8_error_is_at_most_half_a_step(n, scale, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    q, absmax = absmax_quantize(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (absmax_dequantize(q, absmax) - x).abs().max()
    assert err <= absmax / 127 / 2 * (1 + 1e-4)  # half a step, plus float32 rounding


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 500), shift=st.floats(-5, 5), seed=st.integers(0, 2 ** 31))
def test_zeropoint_int8_error_and_range(n, shift, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) + shift
    q, scale, zero_point = zeropoint_quantize(x)
    assert q.min() >= -128 and q.max() <= 127
    err = (zeropoint_dequantize(q, scale, zero_point) - x).abs().max()
    assert err <= (1 / scale) * (1 + 1e-4)  # half a step from rounding plus up to half from rounding the zero point


def test_zeropoint_uses_the_whole_range_on_positive_data():
    x = torch.rand(1000) + 1.0  # all positive: symmetric absmax would leave the negative codes unused
    q, _, _ = zeropoint_quantize(x)
    assert q.min() == -128 and q.max() == 127
    q_sym, _ = absmax_quantize(x)
    assert q_sym.min() > 0


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 700), blocksize=st.sampled_from([1, 16, 64, 100]), seed=st.integers(0, 2 ** 31))
def test_blockwise_error_is_at_most_half_a_step_per_block(n, blocksize, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    q, absmax = blockwise_quantize(x, blocksize)
    assert absmax.numel() == -(-n // blocksize)
    out = blockwise_dequantize(q, absmax, blocksize)
    step = (absmax / 127).repeat_interleave(blocksize)[:n]
    assert ((out - x).abs() <= step / 2 * (1 + 1e-4)).all()


def test_blocks_contain_an_outlier():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    x[10] = 100.0
    whole = mse(absmax_dequantize(*absmax_quantize(x)), x)
    q, absmax = blockwise_quantize(x, 64)
    blocked = mse(blockwise_dequantize(q, absmax, 64), x)
    assert blocked < whole / 20  # only the outlier's own block keeps the coarse grid


@pytest.mark.parametrize("fn", [absmax_quantize, zeropoint_quantize, blockwise_quantize])
def test_bad_input(fn):
    with pytest.raises(ValueError, match="non-finite"):
        fn(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="floating-point"):
        fn(torch.arange(5))
    with pytest.raises(ValueError, match="empty"):
        fn(torch.empty(0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([1.0])
    with pytest.raises(ValueError, match="bits must be"):
        fn(torch.ones(3), bits=9)


def test_bad_blocksize():
    with pytest.raises(ValueError, match="blocksize must be a positive integer"):
        blockwise_quantize(torch.ones(3), blocksize=0)
