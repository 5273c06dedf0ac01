"""The hand-written 4-bit matmul against bitsandbytes' MatMul4Bit (bnb.matmul_4bit), on real kernels."""
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_tutorial import Qlora_4_bit
from qlora_tutorial import matmul4bit as mm
from qlora_tutorial import nf4_triton  # registers the Triton kernel as a backend (NF4 on CUDA)
from qlora_tutorial.matmul4bit import MatMul4bit, matmul_4bit, saved_tensors
from qlora_tutorial.nf4 import State4bit, as_state, dequantize_nf4, quantize_nf4

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def quantized(out_features=96, in_features=128, double_quant=False, quant_type="nf4", device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out_features, in_features, generator=g) * 0.05).to(device)
    return bnbF.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_outputs_and_gradients_match_bitsandbytes(device, double_quant, quant_type, dtype, with_bias):
    packed, state = quantized(double_quant=double_quant, quant_type=quant_type, device=device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 128, generator=g).to(device, dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    bias = torch.randn(96, generator=g).to(device, dtype).requires_grad_() if with_bias else None
    bias_ref = bias.detach().clone().requires_grad_() if with_bias else None

    ours = matmul_4bit(x, packed, state, bias)
    theirs = bnb.matmul_4bit(x_ref, packed, quant_state=state, bias=bias_ref)
    grad = torch.randn(theirs.shape, generator=g).to(device, dtype)
    ours.backward(grad)
    theirs.backward(grad)

    # bitsandbytes' default kernel is dequantize-then-linear too: on the CPU the results are identical.
    tol = 0 if device == "cpu" else (1e-5 if dtype == torch.float32 else 2e-2)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape == (2, 5, 96)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    assert x.grad.abs().sum() > 0
    if with_bias:
        # bitsandbytes sums over the first dimension and lets autograd sum the rest: in bfloat16 that
        # order of additions rounds differently from one sum over all tokens.
        bias_tol = 1e-5 if dtype == torch.float32 else 6e-2
        torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=bias_tol, atol=bias_tol)


def test_dequantization_is_the_books_own_nf4():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    packed, state = quantize_nf4(W, double_quant=True)
    packed_bnb, state_bnb = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, packed_bnb)
    x = torch.randn(3, 128)
    # Our State4bit and bitsandbytes' QuantState give the same product.
    assert torch.equal(matmul_4bit(x, packed, state), matmul_4bit(x, packed_bnb, state_bnb))
    assert torch.equal(matmul_4bit(x, packed, state), x @ dequantize_nf4(packed, state).T)


def test_saves_only_the_packed_weight():
    packed, state = quantized(double_quant=True)
    x = torch.randn(4, 128, requires_grad=True)
    saved = saved_tensors(lambda a: matmul_4bit(a, packed, state), x)
    assert saved == [((96 * 128 // 2, 1), torch.uint8)]
    # Nothing to save when no gradient is wanted: a frozen input, as at the first layer of a model.
    assert saved_tensors(lambda a: matmul_4bit(a, packed, state), x.detach()) == []
    # bitsandbytes keeps the same (packed bytes and state) on ctx.tensors, out of the hooks' sight.
    y = bnb.matmul_4bit(x, packed, quant_state=state)
    assert y.grad_fn.tensors[0] is None and y.grad_fn.tensors[1].dtype == torch.uint8


def test_lora_layer_saves_no_dense_weight():
    """A QLoRA layer built on the hand-written matmul: backward keeps x for the adapters, not W."""
    torch.manual_seed(0)
    layer = Qlora_4_bit(128, 96, alpha=16, r=4, bias=False, compute_dtype=torch.float32)
    w = layer.quant_nn.weight
    x = torch.randn(2, 3, 128, requires_grad=True)

    def forward(a):
        return matmul_4bit(a, w.data, w.quant_state) + layer.scale * ((a @ layer.W_a) @ layer.W_b)

    saved = saved_tensors(forward, x)
    shapes = [shape for shape, _ in saved]
    assert (96, 128) not in shapes and (128, 96) not in shapes
    assert ((2 * 3, 128), torch.float32) in saved  # x (as tokens x in), kept by the LoRA branch for W_a's gradient
    assert ((96 * 128 // 2, 1), torch.uint8) in saved
    torch.testing.assert_close(forward(x), layer(x), rtol=1e-6, atol=1e-6)


def test_no_gradient_for_the_frozen_weight():
    packed, state = quantized()
    x = torch.randn(3, 128, requires_grad=True)
    matmul_4bit(x, packed, state).sum().backward()
    assert x.grad is not None and not packed.requires_grad


def test_bad_input_is_named():
    packed, state = quantized()
    with pytest.raises(ValueError, match="x has 100 features"):
        matmul_4bit(torch.randn(2, 100), packed, state)
    with pytest.raises(TypeError, match="uint8"):
        matmul_4bit(torch.randn(2, 128), packed.float(), state)
    with pytest.raises(TypeError, match="quant_state must be"):
        matmul_4bit(torch.randn(2, 128), packed, "not a state")
    assert isinstance(State4bit.from_bnb(state), State4bit)


# ---------------------------------------------------------------- the backends, picked in one place
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features, in_features", [(96, 128), (1, 2), (3, 64)])
def test_every_backend_gives_bitsandbytes_bytes(device, double_quant, quant_type, dtype, out_features, in_features):
    """The weight the Function multiplies with is bitsandbytes' dequantization, whichever backend makes it
    (a one-byte weight included: bitsandbytes returns that one transposed)."""
    packed, bnb_state = quantized(out_features, in_features, double_quant, quant_type, device)
    state = as_state(bnb_state)
    expected = bnbF.dequantize_4bit(packed.reshape(-1, 1), bnb_state)
    expected = (expected.t() if packed.numel() == 1 else expected).to(dtype)
    assert expected.shape == (out_features, in_features)
    names = [b.name for b in mm.BACKENDS if b.handles(packed, state)]
    assert "reference" in names  # and bitsandbytes wherever its kernel is right: not CPU rows that split a block
    assert ("bitsandbytes" in names) == (device == "cuda" or in_features % 64 == 0)
    assert ("triton" in names) == (device == "cuda" and quant_type == "nf4" and nf4_triton.triton_available())
    for name in names:
        with mm.use_backend(name):
            assert torch.equal(mm.dequantize(packed, state, dtype), expected), name


def test_pick_backend_is_the_one_choice():
    aligned, aligned_state = quantized(in_features=128)  # rows of two whole blocks
    split, split_state = quantized(in_features=96)  # rows of one and a half blocks
    assert mm.pick_backend(aligned, as_state(aligned_state)).name == "bitsandbytes"
    # bitsandbytes 0.50's CPU kernel reads the wrong block scales for rows that split a block
    assert mm.pick_backend(split, as_state(split_state)).name == "reference"
    with mm.use_backend("reference"):
        assert mm.pick_backend(aligned, as_state(aligned_state)).name == "reference"
    assert mm.pick_backend(aligned, as_state(aligned_state)).name == "bitsandbytes"  # back after the block
    with pytest.raises(ValueError, match="no 4-bit backend named 'cutlass'.*reference"):
        with mm.use_backend("cutlass"):
            pass
    with mm.use_backend("bitsandbytes"), pytest.raises(ValueError, match="'bitsandbytes'.*cannot dequantize"):
        mm.dequantize(split, as_state(split_state))  # a backend that would give wrong numbers is refused
    # the Triton kernel (registered when qlora_tutorial.nf4_triton is imported) takes NF4 weights on CUDA only
    assert mm.BACKENDS[0] is nf4_triton.TRITON
    assert not nf4_triton.handles(aligned, as_state(aligned_state))  # a CPU tensor


def test_the_operators_are_one_opaque_call_each():
    """Under torch.compile dequantization is a custom operator; the backward's twin has the same body."""
    packed, bnb_state = quantized(double_quant=True)
    s = as_state(bnb_state)
    args = (packed, s.absmax, s.code, s.offset, s.absmax2, s.code2, s.blocksize, s.blocksize2, 96, 128, "nf4",
            torch.float32)
    torch.library.opcheck(torch.ops.qlora_tutorial.dequantize_4bit.default, args)
    torch.library.opcheck(torch.ops.qlora_tutorial.dequantize_4bit_again.default, args)
    expected = bnbF.dequantize_4bit(packed, bnb_state)
    assert torch.equal(mm.dequantize_op(*args), expected) and torch.equal(mm.dequantize_again(*args), expected)
    assert torch.equal(mm.dequantize(packed, s, operator=True), expected)
    with pytest.raises(ValueError, match="2-D"):
        mm.dequantize(packed, State4bit(s.absmax, torch.Size([96 * 128]), torch.float32))


# ---------------------------------------------------------------- the layer runs this Function
def count_function_calls(monkeypatch) -> list:
    calls = []
    forward = MatMul4bit.forward

    def counting(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    monkeypatch.setattr(MatMul4bit, "forward", staticmethod(counting))
    return calls


def dense_tensors_saved(fn, x, out_features, in_features) -> list:
    return [(shape, dtype) for shape, dtype in saved_tensors(fn, x)
            if dtype.is_floating_point and torch.Size(shape).numel() >= out_features * in_features]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_features, blocksize", [(128, 64), (96, 64), (64, 32)])
@pytest.mark.parametrize("require_lora", [True, False])
def test_the_layer_calls_the_function_and_keeps_no_dense_weight(monkeypatch, device, in_features, blocksize,
                                                                require_lora):
    """Qlora_4_bit's forward is chapter 11's Function, once per call, on every device and for every row
    length (the CPU's rows that split a block included: their dequantization backend differs, not the
    Function); what autograd keeps for the backward is never a dense weight."""
    torch.manual_seed(0)
    layer = Qlora_4_bit(in_features, 64, alpha=8, r=4, require_lora=require_lora, blocksize=blocksize,
                        compute_dtype=torch.float32, device=device)
    calls = count_function_calls(monkeypatch)
    x = torch.randn(2, 3, in_features, device=device, requires_grad=True)
    y = layer(x)
    assert len(calls) == 1 and type(y.grad_fn).__name__ in ("AddBackward0", "MatMul4bitBackward")
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    assert dense_tensors_saved(layer, x, 64, in_features) == []
    assert ((64 * in_features // 2, 1), torch.uint8) in saved_tensors(layer, x)  # the packed bytes instead
    assert len(calls) == 3  # two more forwards, inside saved_tensors
