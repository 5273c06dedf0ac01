"""Qlora_4_bit against the real bitsandbytes and PEFT: modes, exact weights, PEFT equivalence, errors."""
import copy
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from qlora_tutorial import Qlora_4_bit
from qlora_tutorial.layer import DenseBase
from qlora_tutorial.lora import kaiming_bound, lora_scale
from qlora_tutorial.nf4 import State4bit, dequantize_nf4

IN, OUT = 128, 96


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def randomize_adapters(layer, seed=1):
    """W_b starts at zero (so LoRA does nothing yet); give both matrices values that show up in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.W_a.copy_(torch.randn(layer.W_a.shape, generator=g) * 0.1)
        layer.W_b.copy_(torch.randn(layer.W_b.shape, generator=g) * 0.1)


class Holder(nn.Module):
    """A one-layer model, so PEFT has a named module to target."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


# ---------------------------------------------------------------- construction and modes
def test_qlora_mode_holds_exactly_what_bitsandbytes_quantizes(linear):
    layer = Qlora_4_bit.from_linear(copy.deepcopy(linear), alpha=4, r=2)
    assert isinstance(layer.quant_nn, bnb.nn.Linear4bit) and layer.is_quantized
    # QLoRA as the paper defines it: NF4 plus double quantization (the absmax constants in 8 bits)
    packed, state = bnbF.quantize_4bit(linear.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = layer.quant_nn.weight
    assert w.dtype == torch.uint8 and torch.equal(w.data, packed)
    assert w.quant_state.nested and torch.equal(w.quant_state.absmax, state.absmax)
    assert torch.equal(w.quant_state.state2.absmax, state.state2.absmax) and w.quant_state.offset == state.offset
    assert w.quant_state.quant_type == "nf4" and w.quant_state.blocksize == 64
    assert torch.equal(layer.quant_nn.bias, linear.bias)
    assert torch.equal(layer.base_weight(), bnbF.dequantize_4bit(packed, state))
    assert w.numel() * 2 == IN * OUT  # two 4-bit codes per byte


def test_qlora_defaults_to_double_quantization(linear):
    """QLoRA as the paper (and bitsandbytes' usual BitsAndBytesConfig) defines it: NF4 + double quantization."""
    assert Qlora_4_bit.from_linear(copy.deepcopy(linear), 4, 2).quant_nn.weight.quant_state.nested
    for off in (dict(double_quant=False), dict(compress_statistics=False)):  # bitsandbytes' name works too
        layer = Qlora_4_bit.from_linear(copy.deepcopy(linear), 4, 2, **off)
        assert not layer.quant_nn.weight.quant_state.nested and layer.settings()["double_quant"] is False
    for both in (dict(double_quant=False, compress_statistics=True), dict(double_quant=True, compress_statistics=False)):
        with pytest.raises(ValueError, match="the same setting"):
            Qlora_4_bit.from_linear(copy.deepcopy(linear), 4, 2, **both)


def test_double_quantization_and_fp4_options(linear):
    layer = Qlora_4_bit.from_linear(linear, alpha=4, r=2, double_quant=True, quant_type="fp4")
    state = layer.quant_nn.weight.quant_state
    assert state.nested and state.quant_type == "fp4"
    packed, ref = bnbF.quantize_4bit(linear.weight.data, compress_statistics=True, quant_type="fp4")
    assert torch.equal(layer.quant_nn.weight.data, packed)
    assert torch.equal(layer.base_weight(), bnbF.dequantize_4bit(packed, ref))


def test_lora_mode_keeps_the_original_weight_frozen_in_its_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT, dtype=torch.bfloat16)
    w0 = lin.weight.detach().clone()
    layer = Qlora_4_bit.from_linear(lin, alpha=4, r=2, use_qlora=False)
    # the dense base holds the given layer's own parameters: no copy
    assert isinstance(layer.quant_nn, DenseBase) and layer.quant_nn.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad
    assert layer.quant_nn.weight.dtype == torch.bfloat16 and torch.equal(layer.base_weight(), w0)
    assert not any(p.requires_grad for p in layer.quant_nn.parameters())
    assert layer.W_a.dtype == torch.float32  # adapters are float32 master weights
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16  # adapters are cast to the input's dtype


def test_quantization_only_mode_has_no_adapters_and_matches_the_dequantized_matmul(linear):
    layer = Qlora_4_bit.from_linear(linear, alpha=4, r=2, require_lora=False)
    assert layer.W_a is None and layer.W_b is None
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(4, IN)
    expected = x @ layer.base_weight().T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=2e-5)
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("use_qlora", [True, False])
def test_forward_is_base_plus_scaled_low_rank_product(linear, use_qlora):
    layer = Qlora_4_bit.from_linear(linear, alpha=8, r=4, use_qlora=use_qlora)
    randomize_adapters(layer)
    x = torch.randn(2, 5, IN)
    base = layer.quant_nn(x)
    torch.testing.assert_close(layer(x), base + 2.0 * (x @ layer.W_a) @ layer.W_b)
    torch.testing.assert_close(layer(x), x @ layer.merged_weight().T + linear.bias, rtol=1e-5, atol=2e-5)


def test_train_and_eval_mode_give_the_same_output(linear):
    """bitsandbytes' CPU eval path would repack the weight with bf16 scales; the layer keeps one layout."""
    layer = Qlora_4_bit.from_linear(linear, alpha=4, r=2)
    randomize_adapters(layer)
    x = torch.randn(3, IN)
    y_train = layer.train()(x).detach()
    with torch.no_grad():
        y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval)
    assert not getattr(layer.quant_nn.weight.quant_state, "packing_format_for_cpu", False)


def test_new_layer_from_sizes_is_a_valid_layer():
    torch.manual_seed(0)
    layer = Qlora_4_bit(IN, OUT, alpha=4, r=2, bias=False)
    assert layer.quant_nn.bias is None and layer.is_quantized
    assert layer(torch.randn(2, IN)).shape == (2, OUT)


def test_scale_and_rslora():
    lin = nn.Linear(IN, OUT)
    assert Qlora_4_bit.from_linear(lin, alpha=16, r=4, use_qlora=False).scale == 4.0
    lin = nn.Linear(IN, OUT)
    assert Qlora_4_bit.from_linear(lin, alpha=16, r=4, use_qlora=False, rslora=True).scale == 8.0


def test_init_is_peft_like_fan_in_is_in_features():
    torch.manual_seed(0)
    layer = Qlora_4_bit(1024, 64, alpha=4, r=8, use_qlora=False)
    assert torch.count_nonzero(layer.W_b) == 0
    bound = kaiming_bound(1024)  # 1/sqrt(in) = 0.03125; with fan_in = r it would be 1/sqrt(8)
    amax = layer.W_a.abs().max().item()
    assert amax <= bound and amax > 0.95 * bound


def test_default_compute_dtype_on_cpu_is_float32(linear, monkeypatch):
    monkeypatch.setenv("QLORA_DEVICE", "cpu")
    layer = Qlora_4_bit.from_linear(linear, alpha=4, r=2)
    assert layer.quant_nn.compute_dtype == torch.float32
    layer = Qlora_4_bit.from_linear(nn.Linear(IN, OUT), alpha=4, r=2, compute_dtype=torch.bfloat16)
    assert layer.quant_nn.compute_dtype == torch.bfloat16


# ---------------------------------------------------------------- gradients
def test_only_the_adapters_receive_gradients(linear):
    layer = Qlora_4_bit.from_linear(linear, alpha=4, r=2)
    layer(torch.randn(4, IN)).pow(2).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert grads["W_b"] is not None and grads["W_b"].abs().sum() > 0
    # W_b = 0 at the start, so dL/dW_a = 0 on the first step (the LoRA paper's design)
    assert grads["W_a"] is not None and torch.count_nonzero(grads["W_a"]) == 0
    assert all(grads[n] is None for n in grads if n.startswith("quant_nn"))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["W_a", "W_b"]


# ---------------------------------------------------------------- PEFT equivalence
def copy_into_peft(peft_model, layer):
    lp = peft_model.base_model.model.proj
    with torch.no_grad():
        lp.lora_A["default"].weight.copy_(layer.W_a.T)  # (r, in)
        lp.lora_B["default"].weight.copy_(layer.W_b.T)  # (out, r)
    return lp


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_mode_equals_peft_lora(linear, rslora):
    peft_model = get_peft_model(Holder(copy.deepcopy(linear)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0, use_rslora=rslora))
    layer = Qlora_4_bit.from_linear(copy.deepcopy(linear), alpha=8, r=4, use_qlora=False, rslora=rslora)
    randomize_adapters(layer)
    lp = copy_into_peft(peft_model, layer)
    assert lp.scaling["default"] == layer.scale == lora_scale(8, 4, rslora)
    x = torch.randn(3, 7, IN)
    torch.testing.assert_close(layer(x), peft_model(x), rtol=2e-6, atol=1e-6)
    # and the merged dense weight is PEFT's merged weight
    torch.testing.assert_close(layer.merged_weight(), lp.get_base_layer().weight + lp.get_delta_weight("default"),
                               rtol=0, atol=1e-6)


def test_qlora_mode_equals_peft_on_a_bitsandbytes_base(linear):
    base = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    base.load_state_dict(linear.state_dict())
    base = base.to("cpu")  # bitsandbytes quantizes here
    base.support_avx512bf16_for_cpu = False  # same CPU path as ours in eval mode
    holder = Holder(base)
    holder.is_loaded_in_4bit = True  # what transformers sets; makes PEFT pick its bitsandbytes LoRA layer
    peft_model = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit
    assert isinstance(peft_model.base_model.model.proj, PeftLoraLinear4bit)

    layer = Qlora_4_bit.from_linear(copy.deepcopy(linear), alpha=8, r=4, compute_dtype=torch.float32)
    assert torch.equal(layer.quant_nn.weight.data, base.weight.data)
    randomize_adapters(layer)
    copy_into_peft(peft_model, layer)
    x = torch.randn(3, 7, IN)
    torch.testing.assert_close(layer(x), peft_model(x), rtol=0, atol=1e-5)
    peft_model.eval(), layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), peft_model(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- moving
def test_to_dtype_and_device_keeps_the_packed_weight(linear):
    layer = Qlora_4_bit.from_linear(linear, alpha=4, r=2)
    packed = layer.quant_nn.weight.data.clone()
    layer.to(torch.bfloat16)
    assert layer.quant_nn.weight.dtype == torch.uint8 and torch.equal(layer.quant_nn.weight.data, packed)
    assert layer.W_a.dtype == torch.bfloat16
    layer.to("cpu")
    assert torch.equal(layer.quant_nn.weight.data, packed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moves_to_cuda_and_computes_the_same(linear):
    layer = Qlora_4_bit.from_linear(linear, alpha=4, r=2, compute_dtype=torch.float32)
    randomize_adapters(layer)
    x = torch.randn(3, IN)
    y_cpu = layer(x).detach()
    layer.to("cuda")
    assert layer.quant_nn.weight.device.type == "cuda" and layer.W_a.device.type == "cuda"
    torch.testing.assert_close(layer(x.cuda()).detach().cpu(), y_cpu, rtol=1e-4, atol=1e-4)


def test_a_layer_loaded_alone_names_itself_in_state_dict_errors(linear):
    layer = Qlora_4_bit.from_linear(copy.deepcopy(linear), alpha=4, r=2)
    state = Qlora_4_bit.from_linear(copy.deepcopy(linear), alpha=4, r=2, blocksize=128).state_dict()
    with pytest.raises(RuntimeError, match=r"Qlora_4_bit\(128 -> 96\): the saved weight has .*128"):
        layer.load_state_dict(state)


def test_meta_device_builds_without_quantizing():
    with torch.device("meta"):
        lin = nn.Linear(IN, OUT)
    layer = Qlora_4_bit.from_linear(lin, alpha=4, r=2)
    assert layer.W_a.device.type == "meta" and not layer.is_quantized
    assert layer.quant_nn.weight.shape == (OUT, IN)
    with pytest.raises(RuntimeError, match=r"Qlora_4_bit\(128 -> 96\): its 4-bit weight is not quantized yet"):
        layer(torch.empty(2, IN, device="meta"))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=4, r=0), "rank r must be a positive integer"),
    (dict(alpha=4, r=-2), "rank r must be a positive integer"),
    (dict(alpha=4, r=2.5), "rank r must be a positive integer"),
    (dict(alpha=0, r=2), "alpha must be a positive"),
    (dict(alpha=-1.0, r=2), "alpha must be a positive"),
    (dict(alpha=float("nan"), r=2), "alpha must be a positive"),
    (dict(alpha=4, r=2, quant_type="int4"), "quant_type must be 'nf4', 'fp4' .4-bit. or 'int8'"),
])
def test_bad_arguments(linear, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Qlora_4_bit.from_linear(linear, **kwargs)


def test_not_a_linear():
    with pytest.raises(TypeError, match="must be a torch.nn.Linear, got Conv1d"):
        Qlora_4_bit.from_linear(nn.Conv1d(4, 4, 1), alpha=4, r=2)


def test_already_quantized_linear():
    with pytest.raises(ValueError, match="already quantized"):
        Qlora_4_bit.from_linear(bnb.nn.Linear4bit(IN, OUT), alpha=4, r=2)
    layer = Qlora_4_bit.from_linear(nn.Linear(IN, OUT), alpha=4, r=2)
    with pytest.raises(ValueError, match="already a Qlora_4_bit"):
        Qlora_4_bit.from_linear(layer, alpha=4, r=2)


def test_non_finite_weight(linear):
    with torch.no_grad():
        linear.weight[3, 5] = math.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        Qlora_4_bit.from_linear(linear, alpha=4, r=2)


def test_sizes_must_match_the_given_linear(linear):
    with pytest.raises(ValueError, match="in_features=64"):
        Qlora_4_bit(64, OUT, alpha=4, r=2, linear=linear)


@pytest.mark.parametrize("in_features, blocksize, double_quant", [(48, 64, False), (100, 64, True), (200, 128, False),
                                                                  (80, 32, False)])
def test_rows_that_split_a_block_are_exact_on_cpu(in_features, blocksize, double_quant):
    """bitsandbytes 0.50's CPU kernel reads wrong block scales when in_features % blocksize != 0; the layer
    dequantizes such weights with the package's exact NF4 code instead, in forward, base_weight and merge."""
    from qlora_tutorial.nf4 import quantize_nf4

    torch.manual_seed(0)
    lin = nn.Linear(in_features, 24)
    layer = Qlora_4_bit.from_linear(copy.deepcopy(lin), alpha=4, r=2, blocksize=blocksize,
                                    double_quant=double_quant)
    randomize_adapters(layer)
    packed, state = quantize_nf4(lin.weight.data, blocksize=blocksize, double_quant=double_quant)
    exact = dequantize_nf4(packed, state)
    assert torch.equal(layer.quant_nn.weight.data, packed)  # the same bytes as bitsandbytes stores
    assert torch.equal(layer.base_weight(), exact)
    torch.testing.assert_close(layer.merged_weight(), exact + layer.delta_weight(), rtol=0, atol=0)
    x = torch.randn(5, in_features, requires_grad=True)
    y = layer(x)
    expected = x.detach() @ exact.T + lin.bias.detach() + 2.0 * (x.detach() @ layer.W_a.detach()) @ layer.W_b.detach()
    torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)
    y.pow(2).sum().backward()  # gradients reach the input and the adapters, not the frozen base
    assert x.grad is not None and x.grad.abs().sum() > 0 and layer.W_a.grad.abs().sum() > 0
    assert layer.quant_nn.weight.grad is None


def test_bitsandbytes_cpu_dequantize_errs_only_on_rows_that_split_a_block():
    """The reason for the exact path. bitsandbytes 0.50's CPU kernel reads wrong block scales for rows
    that split a block on this project's AVX-512 machines (not on every CPU: on the GPU machine's CPU
    it was right). Wherever it errs, it errs only there: aligned rows agree with the exact code, and
    the layer is exact either way."""
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    for in_features in (48, 64):
        layer = Qlora_4_bit.from_linear(nn.Linear(in_features, 8), alpha=4, r=2, compute_dtype=torch.float32)
        w = layer.quant_nn.weight
        exact = dequantize_nf4(w.data, State4bit.from_bnb(w.quant_state))
        assert torch.equal(layer.base_weight(), exact)
        if in_features % 64 == 0:
            assert torch.equal(dequantize_4bit(w.data, w.quant_state), exact)
