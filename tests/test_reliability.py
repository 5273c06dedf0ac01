"""The cases of issue 12: a failed call changes nothing, bad input gets the package's own error
(naming the layer, the problem and the fix), and whole quantized models save and load bit-exact."""
import json
import math

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_tutorial import Qlora_4_bit, adapters, quantize_model
from qlora_tutorial.layer import Base4bit
from qlora_tutorial.quantize import wrapped_layers
from qlora_tutorial.models import tiny_llama
from qlora_tutorial.nf4 import dequantize_nf4, quantize_nf4

from .helpers import MLP, assert_unchanged, fails_and_changes_nothing, logits, snapshot, trained

pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")

# ---------------------------------------------------------------- 1. whole-model persistence
@pytest.mark.parametrize("double_quant, quant_type", [(False, "nf4"), (True, "nf4"), (True, "fp4")])
def test_state_dict_round_trip_strict_is_bit_exact(double_quant, quant_type):
    """Case 1a: load_state_dict(strict=True) into a freshly quantized model used to fail on the quant-state keys."""
    model = trained("all", double_quant=double_quant, quant_type=quant_type)
    state = model.state_dict()
    assert any(k.endswith("quant_nn.weight.absmax") for k in state)
    fresh = quantize_model(tiny_llama(seed=1), "all", alpha=8, r=4, double_quant=double_quant,
                           quant_type=quant_type).eval()
    assert not torch.equal(logits(fresh), logits(model))
    keys = list(state)
    result = fresh.load_state_dict(state, strict=True)
    assert list(state) == keys  # the caller's dict is not consumed
    assert not result.missing_keys and not result.unexpected_keys
    again = fresh.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert torch.equal(logits(fresh), logits(model))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]


def test_state_dict_non_strict_loads_the_block_scales_too():
    """Case 1b: strict=False used to copy the packed bytes but keep the old absmax (logits 0.18 off, no error)."""
    model = trained()
    fresh = quantize_model(tiny_llama(seed=1), MLP, alpha=8, r=4).eval()
    fresh.load_state_dict(model.state_dict(), strict=False)
    assert torch.equal(logits(fresh), logits(model))
    layer, ref = fresh.model.layers[1].mlp.down_proj, model.model.layers[1].mlp.down_proj
    assert torch.equal(layer.quant_nn.weight.quant_state.absmax, ref.quant_nn.weight.quant_state.absmax)


def test_load_state_dict_refuses_other_quant_settings():
    state = trained(blocksize=128).state_dict()
    fresh = quantize_model(tiny_llama(seed=1), MLP, alpha=8, r=4)
    with pytest.raises(RuntimeError, match=r"model.layers.0.mlp.gate_proj: the saved weight has .*blocksize.*128"):
        fresh.load_state_dict(state)


def test_save_pretrained_refuses_and_says_what_to_do(tmp_path):
    """Case 1c: save_pretrained + from_pretrained used to bring the wrapped layers back at random (0.64 off)."""
    model = trained()
    with pytest.raises(RuntimeError, match="save_pretrained cannot save a model with Qlora_4_bit layers.*save_adapter"
                                           ".*save_quantized.*merge"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # merged into plain layers it is an ordinary transformers model again
    from transformers import AutoModelForCausalLM

    merged = adapters.merge(model)
    merged.save_pretrained(tmp_path / "merged")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(back), logits(merged))


@pytest.mark.parametrize("double_quant", [False, True])
def test_save_quantized_load_quantized_is_bit_exact(tmp_path, double_quant):
    model = trained("all", double_quant=double_quant)
    quantize_model(model, ["lm_head"], alpha=2, r=1, require_lora=False, blocksize=128)  # other settings too
    adapters.save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized.json", "quantized.safetensors"]
    header_len = int.from_bytes((tmp_path / "quantized.safetensors").read_bytes()[:8], "little")
    json.loads((tmp_path / "quantized.safetensors").read_bytes()[8:8 + header_len])  # safetensors, not pickle
    for start in (tiny_llama(seed=1), model.config):  # a plain model of the architecture, or its config
        back = adapters.load_quantized(start, tmp_path).eval()
        assert wrapped_layers(back) == wrapped_layers(model)
        state, ref = back.state_dict(), model.state_dict()
        assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
        assert torch.equal(logits(back), logits(model))
        assert back.lm_head.quant_nn.weight.blocksize == 128 and back.lm_head.W_a is None
        assert {n for n, p in back.named_parameters() if p.requires_grad} == \
            {n for n, p in model.named_parameters() if p.requires_grad}


def test_save_quantized_with_tied_embeddings(tmp_path):
    base = tiny_llama(seed=0)
    base.lm_head.weight = base.model.embed_tokens.weight
    model = quantize_model(base, MLP, alpha=8, r=4)
    adapters.save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "quantized.json").read_text())
    assert config["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    fresh = tiny_llama(seed=1)
    fresh.lm_head.weight = fresh.model.embed_tokens.weight
    back = adapters.load_quantized(fresh, tmp_path).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(logits(back), logits(model.eval()))


def test_load_quantized_into_the_wrong_model_changes_nothing(tmp_path):
    adapters.save_quantized(trained(), tmp_path)
    other = tiny_llama(hidden_size=32, intermediate_size=64, seed=0)
    fails_and_changes_nothing(other, lambda: adapters.load_quantized(other, tmp_path), "shapes differ between the file and the model")
    tensors = load_file(str(tmp_path / "quantized.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.quant_nn.weight.absmax"]
    save_file(tensors, str(tmp_path / "quantized.safetensors"))
    plain = tiny_llama(seed=0)
    fails_and_changes_nothing(plain, lambda: adapters.load_quantized(plain, tmp_path), "missing from the file: model.layers.1.mlp.up_proj.quant_nn.weight.absmax")


# ---------------------------------------------------------------- 2. a failed call changes nothing
def test_quantize_model_with_nan_in_the_last_target_changes_nothing():
    """Case 2a (and 4d): 5 of 6 layers used to be replaced already, nothing frozen; the error named no layer."""
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = math.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj: the weight has NaN or inf entries "
                                         r"\(the first at index \[3, 7\]\)"):
        quantize_model(model, MLP, alpha=4, r=2)
    assert_unchanged(model, before)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = 0.0
    assert len(wrapped_layers(quantize_model(model, MLP, alpha=4, r=2))) == 6  # the retry works


def test_quantize_model_restores_the_model_when_building_a_layer_fails(monkeypatch):
    """Even an error no check foresaw (here: inside bitsandbytes, on the last layer) leaves the model as it was."""
    model = tiny_llama(seed=0)
    before = snapshot(model)
    real = Base4bit.quantize
    calls = []

    def failing(linear, *args):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated failure in bitsandbytes")
        return real(linear, *args)

    monkeypatch.setattr(Base4bit, "quantize", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_model(model, MLP, alpha=4, r=2)
    assert_unchanged(model, before)
    for use_qlora in (False,):  # LoRA mode freezes the original layers themselves: restored too
        with pytest.raises(ValueError):
            quantize_model(model, MLP + ["nothing_like_this"], alpha=4, r=2, use_qlora=use_qlora)
        assert_unchanged(model, before)


def test_failed_load_adapter_changes_nothing_and_a_retry_works(tmp_path):
    """Case 2b/2c: a failed load_adapter used to leave the model wrapped and frozen; the retry then failed."""
    adapters.save_adapter(trained("all"), tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    good = dict(tensors)
    tensors["model.layers.1.mlp.down_proj.W_b"] = torch.zeros(4, 32)  # a wrong shape, in the last layer
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    model = tiny_llama(seed=0)
    fails_and_changes_nothing(model, lambda: adapters.load_adapter(model, tmp_path), "model.layers.1.mlp.down_proj: the adapter is for a 128 -> 32 layer")
    save_file(good, str(tmp_path / "adapter.safetensors"))
    assert len(wrapped_layers(adapters.load_adapter(model, tmp_path))) == 14


def test_failed_load_adapter_into_a_wrapped_model_changes_nothing(tmp_path):
    adapters.save_adapter(trained(), tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    tensors["model.layers.1.mlp.down_proj.W_a"][0, 0] = math.inf
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    model = trained(seed=5)
    fails_and_changes_nothing(model, lambda: adapters.load_adapter(model, tmp_path), "model.layers.1.mlp.down_proj: the adapter holds NaN or inf")


def test_failed_import_peft_changes_nothing_and_a_retry_works(tmp_path):
    adapters.export_peft(trained("all"), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    good = dict(tensors)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key] = torch.zeros(32, 4)  # out=64 in the model
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = tiny_llama(seed=0)
    fails_and_changes_nothing(model, lambda: adapters.import_peft(model, tmp_path, use_qlora=True), "model.layers.1.mlp.down_proj: the adapter is for a 128 -> 32 layer")
    save_file(good, str(tmp_path / "adapter_model.safetensors"))
    assert len(wrapped_layers(adapters.import_peft(model, tmp_path, use_qlora=True))) == 14


def test_failed_merge_changes_nothing():
    model = trained()
    fails_and_changes_nothing(model, lambda: adapters.merge(model, dtype=torch.int8), "dtype must be a floating-point torch.dtype")
    with torch.no_grad():  # a diverged update in the last layer: the merged weight is not finite
        model.model.layers[1].mlp.down_proj.W_b[0, 0] = math.inf
    fails_and_changes_nothing(model, lambda: adapters.merge(model, requantize=True), "model.layers.1.mlp.down_proj: the weight has NaN or inf entries")


# ---------------------------------------------------------------- 3. wrong results without an error
def test_quantization_only_without_bias_checks_the_input_width():
    """Case 3a: a (3, 64) input to a 128 -> 64 layer used to return (3, 128), computing x @ W."""
    layer = Qlora_4_bit(128, 64, alpha=4, r=2, require_lora=False, bias=False)
    with pytest.raises(ValueError, match=r"Qlora_4_bit\(128 -> 64\): the input has shape \(3, 64\), but the layer "
                                         r"takes in_features=128 .* pass an input shaped \(\.\.\., 128\)"):
        layer(torch.randn(3, 64))


@pytest.mark.parametrize("use_qlora, require_lora", [(True, True), (False, True), (True, False)])
def test_input_width_is_checked_in_every_mode(use_qlora, require_lora):
    """Case 4c: in QLoRA mode a width of 64 against 128 used to fail inside bitsandbytes ("expanded size ...")."""
    layer = Qlora_4_bit(128, 96, alpha=4, r=2, require_lora=require_lora, use_qlora=use_qlora, name="proj")
    with pytest.raises(ValueError, match="proj: the input has shape .*in_features=128"):
        layer(torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match="proj: the input has shape"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_is_refused(dtype):
    """Case 3b: an int64 input used to be accepted; the LoRA branch became zero and the output was 25.7 off."""
    layer = Qlora_4_bit(128, 64, alpha=4, r=2)
    with pytest.raises(TypeError, match=f"the input is {dtype}, but the layer computes in floating point"):
        layer(torch.ones(3, 128, dtype=dtype))


@pytest.mark.parametrize("sizes", [(0, 64), (64, 0), (-1, 8), (2.5, 8), (True, 8)])
def test_sizes_must_be_positive(sizes):
    """Case 3c: Qlora_4_bit(0, 64) used to build, and its forward returned garbage (1.5e34)."""
    with pytest.raises(ValueError, match="must be a positive integer"):
        Qlora_4_bit(*sizes, alpha=4, r=2)


def test_quantize_model_refuses_a_zero_width_linear():
    model = tiny_llama(seed=0)
    model.model.layers[0].mlp.gate_proj = nn.Linear(64, 0, bias=False)
    fails_and_changes_nothing(model, lambda: quantize_model(model, MLP, alpha=4, r=2), "model.layers.0.mlp.gate_proj: out_features must be a positive integer")


def test_merge_and_base_weight_are_exact_on_cpu_for_rows_that_split_a_block():
    """Case 3d: merge() and base_weight() used bitsandbytes' faulty CPU dequantization (3.1e-3 off)."""
    torch.manual_seed(0)
    lin = nn.Linear(100, 16)
    model = nn.Sequential()
    model.add_module("proj", lin)
    packed, state = quantize_nf4(lin.weight.data, double_quant=True)  # the default: QLoRA double-quantizes
    exact = dequantize_nf4(packed, state)
    quantize_model(model, ["proj"], alpha=4, r=2)
    with torch.no_grad():
        model.proj.W_b.normal_()
    assert torch.equal(model.proj.base_weight(), exact)
    update = model.proj.delta_weight()
    x = torch.randn(4, 100)
    y = model(x).detach()
    adapters.merge(model)
    assert type(model.proj) is nn.Linear and torch.equal(model.proj.weight, exact + update)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [dict(quant_type="fp4"), dict(blocksize=128), dict(double_quant=False),
                                    dict(compute_dtype=torch.bfloat16)])
def test_second_call_with_other_quant_settings_is_an_error(change):
    """Case 3e: a second call with another quant_type, blocksize or double_quant used to be ignored."""
    model = quantize_model(tiny_llama(seed=0), MLP, alpha=4, r=2, compute_dtype=torch.float32)
    before = snapshot(model)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"model.layers.0.mlp.gate_proj is already a Qlora_4_bit and this call asks "
                                         f"for {key}=.*it has"):
        quantize_model(model, MLP, alpha=4, r=2, **change)
    assert_unchanged(model, before)
    quantize_model(model, MLP, alpha=4, r=2)  # the same settings again: fine, nothing wrapped twice


# ---------------------------------------------------------------- 4. the package's own errors
@pytest.mark.parametrize("blocksize", [100, 16, 8192, 64.0, True])
def test_unsupported_blocksize(blocksize):
    """Case 4a: used to fail inside bitsandbytes with 'invalid blocksize 100'."""
    match = r"blocksize must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096\)"
    with pytest.raises(ValueError, match="Qlora_4_bit.*" + match):
        Qlora_4_bit(128, 64, alpha=4, r=2, blocksize=blocksize)
    model = tiny_llama(seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        quantize_model(model, MLP, alpha=4, r=2, blocksize=blocksize)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_unsupported_weight_dtype(dtype):
    """Case 4b: float64 and int32 weights used to fail inside bitsandbytes."""
    model = tiny_llama(seed=0)
    layer = model.model.layers[1].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.detach().to(dtype), requires_grad=False)
    before = snapshot(model)
    message = ("model.layers.1.mlp.up_proj: the weight is torch.float64, but bitsandbytes quantizes only float32, "
               r"float16 and bfloat16 weights; convert the model first \(model.float\(\)\)"
               if dtype == torch.float64 else "model.layers.1.mlp.up_proj: the weight is torch.int32, not floating point")
    with pytest.raises(ValueError, match=message):
        quantize_model(model, MLP, alpha=4, r=2)
    assert_unchanged(model, before)


def test_float64_is_fine_without_quantization():
    lin = nn.Linear(32, 8, dtype=torch.float64)
    layer = Qlora_4_bit.from_linear(lin, alpha=4, r=2, use_qlora=False)
    x = torch.randn(2, 32, dtype=torch.float64)
    assert torch.equal(layer(x), lin(x))  # W_b = 0: the frozen float64 base alone


def test_non_finite_weight_error_names_the_layer():
    """Case 4d."""
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight[2, 9] = -math.inf
    with pytest.raises(ValueError, match=r"^blocks.0: the weight has NaN or inf entries \(the first at index \[2, 9\]\)"):
        Qlora_4_bit.from_linear(lin, alpha=4, r=2, name="blocks.0")


def test_huge_weights_with_double_quantization():
    """Case 4e: weights of 3e38 with double quantization gave an IndexError in nf4.py (bitsandbytes: all NaN)."""
    w = torch.full((64, 256), 3e38)
    with pytest.raises(ValueError, match="double quantization overflows.*double_quant=False"):
        quantize_nf4(w, double_quant=True)
    packed, state = quantize_nf4(w)  # without double quantization they are fine
    assert torch.equal(dequantize_nf4(packed, state), w.float().clamp(max=3e38))
    lin = nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.fill_(3e38)
    with pytest.raises(ValueError, match="proj: double quantization overflows float32.*double_quant=False"):
        Qlora_4_bit.from_linear(lin, alpha=4, r=2, compress_statistics=True, name="proj")  # bitsandbytes' name
