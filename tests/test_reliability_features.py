"""The features after the core layer, tried as a new user would: the int8 base, LoRA+, whole-model
checkpoints, the command line. Each case refuses what it cannot do, with an error of the package's own
that names the problem and the fix, and leaves the model exactly as it was; or it gives the right result.

The numbered cases are the ones found by hand (they gave silent wrong results, partial changes or
errors from inside torch and bitsandbytes); the others came from looking for more of the same kind.
"""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_tutorial import Qlora_4_bit, adapters, quantize_model
from qlora_tutorial.models import tiny_llama
from qlora_tutorial.quantize import wrapped_layers
from qlora_tutorial.variants import loraplus_param_groups

from .helpers import IDS, MLP, fails_and_changes_nothing, logits, trained

pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")


# ---------------------------------------------------------------- the int8 base
def test_1_int8_needs_a_quantized_base():
    with pytest.raises(ValueError, match="quant_type='int8' asks for an 8-bit base, but use_qlora=False"):
        Qlora_4_bit.from_linear(nn.Linear(64, 32), 8, 4, quant_type="int8", use_qlora=False)
    model = tiny_llama(seed=0)
    fails_and_changes_nothing(model, lambda: quantize_model(model, MLP, 8, 4, quant_type="int8", use_qlora=False),
                              "asks for an 8-bit base")


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_2_wrapped_layers_keep_the_models_mode_and_compute_the_same_in_both(quant_type):
    """quantize_model on a model in eval mode gave train-mode 8-bit layers, and bitsandbytes' CPU 8-bit
    matmul differs between the modes (eval quantizes the input too): the logits moved by 1.4e-3 on .eval()."""
    model = quantize_model(tiny_llama(seed=0).eval(), MLP, 8, 4, quant_type=quant_type)
    assert not any(m.training for m in model.modules())  # the new layers follow the model
    eval_logits = logits(model)
    model.train()
    with torch.no_grad():
        train_logits = model(input_ids=IDS).logits
    assert torch.equal(train_logits, eval_logits)
    # what chapter 14 says the 8-bit layer computes, x W^T + b with W the dequantized codes, in both modes
    layer = model.model.layers[0].mlp.gate_proj
    x = torch.randn(3, layer.in_features)
    for mode in (True, False):
        layer.train(mode)
        with torch.no_grad():
            expected = nn.functional.linear(x, layer.base_weight()) + (x @ layer.W_a) @ layer.W_b * layer.scale
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_3_an_adapter_records_its_base_and_a_plain_model_gets_that_base_back(tmp_path):
    model = trained(quant_type="int8")
    adapters.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter.json").read_text())
    assert config["mode"] == "qlora" and config["base"] == {"quant_type": "int8"}
    back = adapters.load_adapter(tiny_llama(seed=0), tmp_path)
    assert all(back.get_submodule(n).is_int8 for n in wrapped_layers(back))
    assert torch.equal(logits(back), logits(model))
    # into a model wrapped with another base: an error, not a silent change of base
    nf4 = quantize_model(tiny_llama(seed=0), MLP, alpha=8, r=4)
    fails_and_changes_nothing(nf4, lambda: adapters.load_adapter(nf4, tmp_path),
                              r"trained on a base with \{'quant_type': 'int8'\}.*nf4")


def test_3_an_nf4_adapter_into_a_model_with_other_4bit_settings_is_refused(tmp_path):
    adapters.save_adapter(trained(blocksize=128), tmp_path)
    assert json.loads((tmp_path / "adapter.json").read_text())["base"] == {
        "quant_type": "nf4", "blocksize": 128, "double_quant": True}
    other = quantize_model(tiny_llama(seed=0), MLP, alpha=8, r=4)
    fails_and_changes_nothing(other, lambda: adapters.load_adapter(other, tmp_path), "'blocksize': 128")
    # a deliberate other base (use_qlora=False: the adapter on the unquantized weights) is fine
    back = adapters.load_adapter(tiny_llama(seed=0), tmp_path, use_qlora=False)
    assert not any(back.get_submodule(n).use_qlora for n in wrapped_layers(back))


def test_4_int8_refuses_weights_beyond_float16():
    """bitsandbytes rounds the weight to float16 before quantizing it: 1e5 became inf, and the outputs NaN."""
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[5, 7] = 1e5
    with pytest.raises(ValueError, match=r"proj: the weight has entries beyond float16's range \(largest magnitude "
                                         r"1e\+05\).*int8.*rounds.*float16"):
        Qlora_4_bit.from_linear(lin, 8, 4, quant_type="int8", name="proj")
    Qlora_4_bit.from_linear(lin, 8, 4, name="proj")  # a 4-bit base keeps float32 block scales: fine


def test_5_a_bfloat16_forward_leaves_the_int8_bias_alone():
    torch.manual_seed(0)
    layer = Qlora_4_bit.from_linear(nn.Linear(64, 32), 8, 4, quant_type="int8")
    x = torch.randn(3, 64)
    before = layer(x).detach()
    layer(x.bfloat16())
    assert layer.bias.dtype == torch.float32
    assert torch.equal(layer(x).detach(), before)


def test_6_merge_errors_of_an_int8_model_requantize_to_int8():
    row = adapters.merge_errors(trained(quant_type="int8"))[0]
    assert "int8_error" in row and "nf4_error" not in row
    # the same number as a merge with requantize=True gives
    model = trained(quant_type="int8")
    exact = model.model.layers[0].mlp.gate_proj.merged_weight()
    merged = adapters.merge(model, requantize=True).model.layers[0].mlp.gate_proj
    assert merged.is_int8
    assert math.isclose(row["int8_error"], (merged.base_weight().float() - exact).norm().item(), rel_tol=1e-6)


# ---------------------------------------------------------------- LoRA+
@pytest.mark.parametrize("kwargs, message", [(dict(lr=1e-3, ratio=math.inf), "ratio"),
                                             (dict(lr=math.inf, ratio=16), "lr must be"),
                                             (dict(lr=math.nan, ratio=16), "lr must be")])
def test_7_loraplus_refuses_infinite_rates(kwargs, message):
    model = quantize_model(tiny_llama(seed=0), MLP, alpha=8, r=4, use_qlora=False)
    with pytest.raises(ValueError, match=message):
        loraplus_param_groups(model, **kwargs)


# ---------------------------------------------------------------- whole-model checkpoints
def saved(tmp_path, **kwargs):
    model = trained(**kwargs)
    adapters.save_quantized(model, tmp_path)
    return model, load_file(str(tmp_path / "quantized.safetensors"))


def refuses_untouched(tmp_path, tensors, match, config=None):
    """load_quantized of the damaged file into a plain model fails and leaves it as it was."""
    save_file(tensors, str(tmp_path / "quantized.safetensors"))
    if config is not None:
        (tmp_path / "quantized.json").write_text(json.dumps(config))
    plain = tiny_llama(seed=1)
    fails_and_changes_nothing(plain, lambda: adapters.load_quantized(plain, tmp_path), match)


def test_8_packed_bytes_of_another_dtype_are_refused_before_anything_loads(tmp_path):
    _, tensors = saved(tmp_path)
    key = "model.layers.0.mlp.gate_proj.quant_nn.weight"
    tensors[key] = tensors[key].to(torch.int8)
    refuses_untouched(tmp_path, tensors, f"{key} is torch.int8 in the file, torch.uint8 in the model")


def test_9_a_garbled_quantization_state_is_refused_with_a_message(tmp_path):
    _, tensors = saved(tmp_path)
    key = "model.layers.0.mlp.gate_proj.quant_nn.weight.quant_state.bitsandbytes__nf4"
    assert key in tensors
    tensors[key] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    refuses_untouched(tmp_path, tensors, r"model.layers.0.mlp.gate_proj: its 4-bit quantization state cannot be read")


@pytest.mark.parametrize("drop", ["layers", "alpha"])
def test_10_a_config_without_its_fields_is_refused_by_name(tmp_path, drop):
    _, tensors = saved(tmp_path)
    config = json.loads((tmp_path / "quantized.json").read_text())
    if drop == "layers":
        del config["layers"]
        match = "quantized.json lacks the field 'layers'"
    else:
        del config["layers"]["model.layers.0.mlp.gate_proj"]["alpha"]
        match = "quantized.json: layer model.layers.0.mlp.gate_proj lacks 'alpha'"
    refuses_untouched(tmp_path, tensors, match, config)


@pytest.mark.parametrize("key", ["model.layers.0.mlp.gate_proj.W_a", "model.embed_tokens.weight"])
def test_11_integer_tensors_where_floats_belong_are_refused(tmp_path, key):
    _, tensors = saved(tmp_path)
    tensors[key] = tensors[key].round().to(torch.int32)
    refuses_untouched(tmp_path, tensors, f"{key} is torch.int32 in the file, torch.float32 in the model")


def test_12_bytes_stored_as_bfloat16_for_fsdp_save_as_bytes(tmp_path):
    from qlora_tutorial.fsdp import set_quant_storage

    model = trained()
    expected = logits(model)
    set_quant_storage(model, torch.bfloat16)
    adapters.save_quantized(model, tmp_path)
    stored = load_file(str(tmp_path / "quantized.safetensors"))["model.layers.0.mlp.gate_proj.quant_nn.weight"]
    assert stored.dtype == torch.uint8
    assert torch.equal(logits(adapters.load_quantized(tiny_llama(seed=1), tmp_path)), expected)


def test_a_file_from_another_base_kind_is_refused_by_an_already_wrapped_model(tmp_path):
    adapters.save_quantized(trained(quant_type="int8"), tmp_path)
    nf4 = quantize_model(tiny_llama(seed=1), MLP, alpha=8, r=4)
    fails_and_changes_nothing(nf4, lambda: adapters.load_quantized(nf4, tmp_path),
                              "already a Qlora_4_bit and this call asks for quant_type='int8'")


def test_a_non_finite_value_in_a_checkpoint_is_refused(tmp_path):
    _, tensors = saved(tmp_path)
    tensors["model.layers.1.mlp.down_proj.W_b"][0, 0] = math.nan
    refuses_untouched(tmp_path, tensors, r"model.layers.1.mlp.down_proj.W_b holds NaN or inf")


# ---------------------------------------------------------------- the fast path and the command line
def test_13_bytes_stored_as_float32_reach_the_matmul_as_bytes():
    """The public 4-bit matmul refuses bytes of another dtype by name; the layer reads them as bytes."""
    from qlora_tutorial.fsdp import set_quant_storage
    from qlora_tutorial.matmul4bit import matmul_4bit

    torch.manual_seed(0)
    layer = Qlora_4_bit.from_linear(nn.Linear(128, 64), alpha=4, r=2, compute_dtype=torch.float32)
    x = torch.randn(3, 128)
    expected = layer(x)
    set_quant_storage(layer, torch.float32)
    w = layer.quant_nn.weight
    with pytest.raises(TypeError, match="packed must be the uint8 tensor of a 4-bit weight, got torch.float32"):
        matmul_4bit(x, w.data, w.quant_state)
    assert torch.equal(layer(x), expected)


@pytest.mark.slow
def test_14_the_bench_asked_for_cuda_without_one_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "qlora_tutorial.bench", "--quick", "--device", "cuda"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--device cuda: this machine has no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- more of the same kinds
@pytest.mark.parametrize("setting", [dict(quant_type="fp4"), dict(blocksize=128), dict(double_quant=False),
                                     dict(compress_statistics=True), dict(compute_dtype=torch.bfloat16)])
def test_quantization_settings_without_a_quantized_base_are_refused(setting):
    """use_qlora=False keeps the weight as it is: a 4-bit setting beside it used to be dropped without a word."""
    name = next(iter(setting)).replace("compress_statistics", "double_quant")  # bitsandbytes' name for it
    with pytest.raises(ValueError, match=f"use_qlora=False keeps the base unquantized.*{name}="):
        Qlora_4_bit.from_linear(nn.Linear(64, 32), 8, 4, use_qlora=False, **setting)
    model = tiny_llama(seed=0)
    fails_and_changes_nothing(model, lambda: quantize_model(model, MLP, 8, 4, use_qlora=False, **setting),
                              "use_qlora=False keeps the base unquantized")


@pytest.mark.parametrize("requantize", [False, True])
def test_merge_keeps_the_models_mode(requantize):
    model = trained().eval()
    merged = adapters.merge(model, requantize=requantize)
    assert not any(m.training for m in merged.modules())


def test_an_adapter_file_with_an_unknown_base_is_refused(tmp_path):
    adapters.save_adapter(trained(), tmp_path)
    config = json.loads((tmp_path / "adapter.json").read_text())
    config["base"] = {"quant_type": "int3"}
    (tmp_path / "adapter.json").write_text(json.dumps(config))
    plain = tiny_llama(seed=0)
    fails_and_changes_nothing(plain, lambda: adapters.load_adapter(plain, tmp_path), "quant_type must be")


def test_dora_on_an_int8_base_saves_loads_and_merges(tmp_path):
    model = trained(quant_type="int8", use_dora=True)
    expected = logits(model)
    adapters.save_adapter(model, tmp_path)
    back = adapters.load_adapter(tiny_llama(seed=0), tmp_path)
    assert back.model.layers[0].mlp.gate_proj.is_int8 and back.model.layers[0].mlp.gate_proj.use_dora
    assert torch.equal(logits(back), expected)
    assert (logits(adapters.merge(back)) - expected).abs().max().item() < 1e-4


# ---------------------------------------------------------------- found by a second look (review)
def test_loading_into_an_int8_model_that_has_run_leaves_it_as_it_was_on_failure(tmp_path):
    """After a forward, bitsandbytes keeps the row scales on the matmul state, and its own loader refuses
    the checkpoint half-way: the package loads them there, and restores every value if a load fails."""
    adapters.save_quantized(trained(quant_type="int8", seed=3), tmp_path)
    model = quantize_model(tiny_llama(seed=1), MLP, alpha=8, r=4, quant_type="int8")
    logits(model)  # a forward moves the row scales
    back = adapters.load_quantized(model, tmp_path)
    assert torch.equal(logits(back), logits(adapters.load_quantized(tiny_llama(seed=1), tmp_path)))
    tensors = load_file(str(tmp_path / "quantized.safetensors"))
    tensors["model.layers.1.mlp.gate_proj.quant_nn.weight_format"] = torch.tensor(1, dtype=torch.uint8)
    refuses_untouched(tmp_path, tensors, r"model.layers.1.mlp.gate_proj: the 8-bit weight's format is 1")


def test_a_file_from_an_untied_model_is_refused_by_a_tied_one(tmp_path):
    adapters.save_quantized(trained(), tmp_path)  # tiny_llama does not tie its embeddings
    tied = tiny_llama(seed=1)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    fails_and_changes_nothing(tied, lambda: adapters.load_quantized(tied, tmp_path),
                              "the model ties model.embed_tokens.weight, lm_head.weight")


def test_load_adapter_refuses_a_use_qlora_the_wrapped_model_does_not_have(tmp_path):
    adapters.save_adapter(trained(), tmp_path)
    nf4 = quantize_model(tiny_llama(seed=0), MLP, alpha=8, r=4)
    fails_and_changes_nothing(nf4, lambda: adapters.load_adapter(nf4, tmp_path, use_qlora=False),
                              "use_qlora=False asks for an unquantized base, but the model is wrapped otherwise")


def test_int8_refuses_double_quant():
    with pytest.raises(ValueError, match="double_quant=False apply to 4-bit bases only"):
        Qlora_4_bit.from_linear(nn.Linear(64, 32), 8, 4, quant_type="int8", double_quant=False)


def test_an_adapter_over_layers_on_different_bases_saves_and_loads_each_base(tmp_path):
    model = quantize_model(tiny_llama(seed=0), ["gate_proj", "up_proj"], alpha=8, r=4)
    quantize_model(model, ["down_proj"], alpha=8, r=4, quant_type="int8")
    expected = logits(model)
    adapters.save_adapter(model, tmp_path)
    assert "bases" in json.loads((tmp_path / "adapter.json").read_text())
    back = adapters.load_adapter(tiny_llama(seed=0), tmp_path)
    assert back.model.layers[0].mlp.down_proj.is_int8 and back.model.layers[0].mlp.up_proj.is_quantized
    assert torch.equal(logits(back), expected)


def test_an_adapter_file_without_its_base_loads_with_a_warning(tmp_path):
    adapters.save_adapter(trained(), tmp_path)
    config = json.loads((tmp_path / "adapter.json").read_text())
    del config["base"]  # as written before the base was recorded
    (tmp_path / "adapter.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="does not record the base"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path)


@pytest.mark.parametrize("damage, match", [
    (dict(base=["nf4"]), "the base of .* must be a dict"),
    (dict(base={"foo": 1}), "the base of .* must be a dict"),
    (dict(mode="lora"), "mode 'lora' .* but the base"),
])
def test_a_damaged_adapter_config_is_refused_by_name(tmp_path, damage, match):
    adapters.save_adapter(trained(), tmp_path)
    config = json.loads((tmp_path / "adapter.json").read_text())
    config.update(damage)
    (tmp_path / "adapter.json").write_text(json.dumps(config))
    plain = tiny_llama(seed=0)
    fails_and_changes_nothing(plain, lambda: adapters.load_adapter(plain, tmp_path), match)


def test_a_damaged_layer_entry_in_quantized_json_is_refused(tmp_path):
    _, tensors = saved(tmp_path)
    config = json.loads((tmp_path / "quantized.json").read_text())
    config["layers"]["model.layers.0.mlp.gate_proj"]["use_qlora"] = "no"
    refuses_untouched(tmp_path, tensors, "layer model.layers.0.mlp.gate_proj has settings {'use_qlora': 'no'}", config)


def test_a_model_keeping_its_bytes_as_bfloat16_is_told_when_to_load(tmp_path):
    from qlora_tutorial.fsdp import set_quant_storage

    adapters.save_quantized(trained(), tmp_path)
    model = quantize_model(tiny_llama(seed=1), MLP, alpha=8, r=4)
    set_quant_storage(model, torch.bfloat16)
    fails_and_changes_nothing(model, lambda: adapters.load_quantized(model, tmp_path), "before calling set_quant_storage")


@pytest.mark.parametrize("weight_decay", [-1.0, math.nan, math.inf])
def test_loraplus_refuses_a_weight_decay_that_is_not_a_finite_non_negative_number(weight_decay):
    model = quantize_model(tiny_llama(seed=0), MLP, alpha=8, r=4, use_qlora=False)
    with pytest.raises(ValueError, match="weight_decay must be"):
        loraplus_param_groups(model, lr=1e-3, weight_decay=weight_decay)


def test_contradictory_layer_arguments_are_refused():
    lin = nn.Linear(64, 32)
    for kwargs in (dict(dtype=torch.float16), dict(device="meta"), dict(bias=False)):
        with pytest.raises(ValueError, match="with linear=..."):
            Qlora_4_bit(64, 32, 8, 4, linear=lin, **kwargs)
    with pytest.raises(ValueError, match="rslora=True sets the LoRA scale, but require_lora=False"):
        Qlora_4_bit.from_linear(lin, 8, 4, require_lora=False, rslora=True)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [(["--steps", "0"], "--steps"), (["--warmup", "0"], "--warmup"),
                                           (["--r", "0"], "--r"), (["--rounds", "0"], "--rounds")])
def test_the_bench_refuses_arguments_that_measure_nothing(tmp_path, args, message):
    csv = tmp_path / "rows.csv"
    csv.write_text("kept\n")
    proc = subprocess.run([sys.executable, "-m", "qlora_tutorial.bench", "--quick", "--csv", str(csv), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert csv.read_text() == "kept\n"  # results of an earlier run are not wiped
