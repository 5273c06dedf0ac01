"""Round trips and bad inputs of qlora_tutorial.adapters, against real safetensors, PEFT and bitsandbytes."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_tutorial import adapters, quantize_model
from qlora_tutorial.layer import Qlora_4_bit
from qlora_tutorial.quantize import wrapped_layers
from qlora_tutorial.models import tiny_llama

from .helpers import MLP, logits, trained

# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("use_qlora", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path, use_qlora):
    model = trained(use_qlora=use_qlora)
    adapters.save_adapter(model, tmp_path / "a")
    fresh = adapters.load_adapter(tiny_llama(seed=0), tmp_path / "a")  # a plain model: wrapped as saved
    assert wrapped_layers(fresh) == wrapped_layers(model)
    for name in wrapped_layers(model):
        a, b = model.get_submodule(name), fresh.get_submodule(name)
        assert torch.equal(a.W_a, b.W_a) and torch.equal(a.W_b, b.W_b)
        assert b.use_qlora == use_qlora
    assert torch.equal(logits(model), logits(fresh))


def test_saved_files_hold_only_the_adapter(tmp_path):
    model = trained(use_qlora=True)
    adapters.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert len(tensors) == 2 * 3 * 2  # 2 layers x 3 MLP projections x (W_a, W_b)
    assert all(k.endswith((".W_a", ".W_b")) for k in tensors)
    assert tensors["model.layers.0.mlp.gate_proj.W_a"].shape == (64, 4)
    assert tensors["model.layers.0.mlp.gate_proj.W_b"].shape == (4, 128)
    config = json.loads((tmp_path / "adapter.json").read_text())
    assert config["mode"] == "qlora" and config["r"] == 4 and config["alpha"] == 8 and config["rslora"] is False
    assert config["targets"][0] == "model.layers.0.mlp.gate_proj" and len(config["targets"]) == 6
    # never pickle: the safetensors header is JSON, and no .bin/.pt file is written
    header_len = int.from_bytes((tmp_path / "adapter.safetensors").read_bytes()[:8], "little")
    json.loads((tmp_path / "adapter.safetensors").read_bytes()[8:8 + header_len])


def test_load_into_other_mode(tmp_path):
    model = trained(use_qlora=True)
    adapters.save_adapter(model, tmp_path)
    lora = adapters.load_adapter(tiny_llama(seed=0), tmp_path, use_qlora=False)
    layer = lora.get_submodule("model.layers.1.mlp.down_proj")
    assert not layer.use_qlora
    assert torch.equal(layer.W_b, model.get_submodule("model.layers.1.mlp.down_proj").W_b)


def test_load_rank_mismatch(tmp_path):
    adapters.save_adapter(trained(use_qlora=False, r=4), tmp_path)
    other = quantize_model(tiny_llama(seed=0), MLP, alpha=8, r=2, use_qlora=False)
    with pytest.raises(ValueError, match="rank 4 .* r=2"):
        adapters.load_adapter(other, tmp_path)


def test_load_scale_mismatch(tmp_path):
    adapters.save_adapter(trained(use_qlora=False, r=4, alpha=8), tmp_path)
    other = quantize_model(tiny_llama(seed=0), MLP, alpha=16, r=4, use_qlora=False)
    with pytest.raises(ValueError, match="scale 4 but the adapter was trained with scale 2"):
        adapters.load_adapter(other, tmp_path)


def test_load_missing_keys(tmp_path):
    adapters.save_adapter(trained(use_qlora=False, targets=["gate_proj"]), tmp_path)
    other = quantize_model(tiny_llama(seed=0), MLP, alpha=8, r=4, use_qlora=False)
    with pytest.raises(ValueError, match="missing from the file: model.layers.0.mlp.down_proj.W_a"):
        adapters.load_adapter(other, tmp_path)


def test_load_unexpected_keys(tmp_path):
    adapters.save_adapter(trained(use_qlora=False), tmp_path)
    other = quantize_model(tiny_llama(seed=0), ["up_proj"], alpha=8, r=4, use_qlora=False)
    with pytest.raises(ValueError, match="in the file but not in the model: model.layers.0.mlp.down_proj.W_a"):
        adapters.load_adapter(other, tmp_path)


def test_load_leaves_nothing_unloaded_when_file_tampered(tmp_path):
    model = trained(use_qlora=False)
    adapters.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.W_b"]
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="missing from the file: model.layers.1.mlp.up_proj.W_b"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path)


def test_load_shape_and_value_checks(tmp_path):
    model = trained(use_qlora=False)
    adapters.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    bad = dict(tensors)
    bad["model.layers.0.mlp.up_proj.W_a"] = torch.zeros(32, 4)
    save_file(bad, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="32 -> 128 layer but the model's is 64 -> 128"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path)
    bad = dict(tensors)
    bad["model.layers.0.mlp.up_proj.W_a"] = torch.full((64, 4), float("nan"))
    save_file(bad, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="NaN or inf"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path)


def test_read_adapter_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter.json is missing"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path)
    adapters.export_peft(trained(use_qlora=False), tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match="use import_peft"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path / "peft")
    adapters.save_adapter(trained(use_qlora=False), tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter.json").read_text())
    (tmp_path / "ours" / "adapter.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path / "ours")
    (tmp_path / "ours" / "adapter.json").write_text(json.dumps({**config, "mode": "full"}))
    with pytest.raises(ValueError, match="mode must be"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path / "ours")


def test_save_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        adapters.save_adapter(tiny_llama(seed=0), tmp_path)
    quantized_only = quantize_model(tiny_llama(seed=0), MLP, alpha=8, r=4, require_lora=False)
    with pytest.raises(ValueError, match="no LoRA layers"):
        adapters.save_adapter(quantized_only, tmp_path)


def test_save_needs_one_setting(tmp_path):
    model = quantize_model(tiny_llama(seed=0), ["gate_proj"], alpha=8, r=4, use_qlora=False)
    quantize_model(model, ["up_proj"], alpha=8, r=2, use_qlora=False)
    with pytest.raises(ValueError, match="do not share one r"):
        adapters.save_adapter(model, tmp_path)


def test_base_model_id_is_never_a_path(tmp_path):
    model = trained(use_qlora=False)
    model.config._name_or_path = str(tmp_path)
    (tmp_path / "PROVENANCE.json").write_text(json.dumps({"hub_id": "org/base"}))
    assert adapters.base_model_id(model) == "org/base"
    (tmp_path / "PROVENANCE.json").unlink()
    assert adapters.base_model_id(model) == tmp_path.name
    model.config._name_or_path = "org/other"
    assert adapters.base_model_id(model) == "org/other"


def test_load_warns_on_other_base(tmp_path):
    model = trained(use_qlora=False)
    model.config._name_or_path = "org/base"
    adapters.save_adapter(model, tmp_path)
    other = tiny_llama(seed=0)
    other.config._name_or_path = "org/other"
    with pytest.warns(UserWarning, match="trained on 'org/base'"):
        adapters.load_adapter(other, tmp_path)


# ---------------------------------------------------------------- PEFT
@pytest.mark.parametrize("rslora", [False, True])
def test_export_peft_loads_in_peft_and_matches(tmp_path, rslora):
    model = trained(use_qlora=False, rslora=rslora, targets=MLP + ["q_proj", "v_proj"])
    adapters.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(MLP + ["q_proj", "v_proj"])
    assert config["use_rslora"] is rslora
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"
    assert torch.equal(tensors[key], model.get_submodule("model.layers.0.mlp.gate_proj").W_a.T)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()
    ours, theirs = logits(model), logits(peft_model)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - logits(tiny_llama(seed=0))).abs().max().item() > 1e-3  # the adapter does change the output


def test_export_peft_partial_targets_use_full_names(tmp_path):
    model = trained(use_qlora=False, targets=["layers.0.mlp.gate_proj"])
    adapters.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.mlp.gate_proj"]
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()
    assert (logits(model) - logits(peft_model)).abs().max().item() < 1e-5


def peft_adapter(folder, rslora=False, **config):
    """A PEFT LoRA adapter with non-zero B, made and saved by PEFT itself."""
    torch.manual_seed(1)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "o_proj"], use_rslora=rslora,
                                  task_type="CAUSAL_LM", **config)
    model = peft.get_peft_model(tiny_llama(seed=0), lora_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(folder))
    return model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_matches_peft(tmp_path, rslora):
    theirs = peft_adapter(tmp_path, rslora=rslora)
    ours = adapters.import_peft(tiny_llama(seed=0), tmp_path, use_qlora=False).eval()
    assert len(wrapped_layers(ours)) == 4
    assert ours.get_submodule("model.layers.0.self_attn.o_proj").rslora is rslora
    assert (logits(ours) - logits(theirs)).abs().max().item() < 1e-5


def test_import_peft_qlora_holds_the_same_matrices(tmp_path):
    theirs = peft_adapter(tmp_path)
    ours = adapters.import_peft(tiny_llama(seed=0), tmp_path, use_qlora=True)
    layer = ours.get_submodule("model.layers.1.mlp.gate_proj")
    assert layer.is_quantized
    peft_layer = theirs.base_model.model.model.layers[1].mlp.gate_proj
    assert torch.equal(layer.W_a, peft_layer.lora_A["default"].weight.T)
    assert torch.equal(layer.W_b, peft_layer.lora_B["default"].weight.T)


@pytest.mark.parametrize("use_qlora", [False, True])
def test_export_import_round_trip_is_bit_exact(tmp_path, use_qlora):
    model = trained(use_qlora=use_qlora)
    adapters.export_peft(model, tmp_path)
    back = adapters.import_peft(tiny_llama(seed=0), tmp_path, use_qlora=use_qlora)
    assert torch.equal(logits(model), logits(back))


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("rank_pattern", {"gate_proj": 2}), ("alpha_pattern", {"gate_proj": 2}),
    ("fan_in_fan_out", True), ("bias", "all"), ("modules_to_save", ["lm_head"]), ("lora_bias", True),
    ("init_lora_weights", "pissa"), ("init_lora_weights", "loftq"), ("some_future_field", 3),
])
def test_import_peft_refuses_what_it_cannot_honour(tmp_path, field, value):
    adapters.export_peft(trained(use_qlora=False), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(ValueError, match=field):
        adapters.import_peft(tiny_llama(seed=0), tmp_path)


def test_import_peft_reads_dora_made_by_peft(tmp_path):
    theirs = peft_adapter(tmp_path, use_dora=True)
    with torch.no_grad():  # a trained magnitude, not its initial value, must arrive
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    theirs.save_pretrained(str(tmp_path))
    ours = adapters.import_peft(tiny_llama(seed=0), tmp_path, use_qlora=False).eval()
    assert ours.get_submodule("model.layers.0.mlp.gate_proj").use_dora
    assert (logits(ours) - logits(theirs)).abs().max().item() < 1e-5


def test_import_peft_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        adapters.import_peft(tiny_llama(seed=0), tmp_path)
    adapters.export_peft(trained(use_qlora=False), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key_b = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"

    extra = {**tensors, "base_model.model.lm_head.weight": torch.zeros(256, 64)}
    save_file(extra, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not plain LoRA matrices: base_model.model.lm_head.weight"):
        adapters.import_peft(tiny_llama(seed=0), tmp_path)

    unpaired = {k: v for k, v in tensors.items() if k != key_b}
    save_file(unpaired, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"unpaired .*up_proj \(lora_B missing\)"):
        adapters.import_peft(tiny_llama(seed=0), tmp_path)

    no_layer = {k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}
    save_file(no_layer, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="targeted but without weights: model.layers.1.mlp.down_proj"):
        adapters.import_peft(tiny_llama(seed=0), tmp_path)

    wrong_rank = {**tensors, key_b: torch.zeros(128, 3)}
    save_file(wrong_rank, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="rank r=4"):
        adapters.import_peft(tiny_llama(seed=0), tmp_path)

    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        adapters.import_peft(tiny_llama(seed=0), tmp_path)


def test_import_peft_other_model(tmp_path):
    peft_adapter(tmp_path)
    other = tiny_llama(hidden_size=32, intermediate_size=64, seed=0)
    with pytest.raises(ValueError, match="another base model"):
        adapters.import_peft(other, tmp_path)


def test_import_peft_wrong_peft_type(tmp_path):
    adapters.export_peft(trained(use_qlora=False), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only 'LORA'"):
        adapters.import_peft(tiny_llama(seed=0), tmp_path)


# ---------------------------------------------------------------- merge
def test_merge_lora_mode_is_exact():
    model = trained(use_qlora=False)
    before = logits(model)
    adapters.merge(model)
    assert not wrapped_layers(model)
    layer = model.get_submodule("model.layers.0.mlp.gate_proj")
    assert type(layer) is nn.Linear and not layer.weight.requires_grad
    assert (logits(model) - before).abs().max().item() < 1e-5


def test_merge_qlora_keep_16_32_bit():
    model = trained(use_qlora=True)
    before = logits(model)
    q = model.get_submodule("model.layers.1.mlp.up_proj")
    expected = q.base_weight().float() + q.delta_weight()
    adapters.merge(model)
    merged = model.get_submodule("model.layers.1.mlp.up_proj")
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert torch.equal(merged.weight, expected)
    assert (logits(model) - before).abs().max().item() < 1e-5


def test_merge_qlora_requantize_and_errors():
    model = trained(use_qlora=True)
    before = logits(model)
    rows = adapters.merge_errors(model)
    assert len(rows) == 6 and rows[0]["layer"] == "model.layers.0.mlp.gate_proj"
    for row in rows:
        assert row["delta"] > 0
        assert row["float16_error"] < row["nf4_error"]  # 16-bit rounding is far smaller than 4-bit rounding
        assert 0 < row["bfloat16_max_abs"] and 0 < row["nf4_max_abs"]
        assert 0 <= row["codes_changed"] <= 1
    adapters.merge(model, requantize=True)
    merged = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(merged, Qlora_4_bit) and merged.is_quantized and not merged.require_lora
    diff = (logits(model) - before).abs().max().item()
    assert 1e-5 < diff < 1.0  # rounding to NF4 again moves the output, a little


def test_merge_dtype_and_no_adapter():
    model = trained(use_qlora=False)
    adapters.merge(model, dtype=torch.bfloat16)
    assert model.get_submodule("model.layers.0.mlp.gate_proj").weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no LoRA layers"):
        adapters.merge(model)


def test_merge_errors_codes_changed():
    model = trained(use_qlora=True)
    layer = model.get_submodule("model.layers.0.mlp.gate_proj")
    with torch.no_grad():
        layer.W_b.zero_()  # no update: requantizing gives back every code
    assert adapters.merge_errors(model)[0]["codes_changed"] == 0.0
    with torch.no_grad():
        layer.W_b.fill_(10.0)  # a huge update moves almost every weight to another code
    assert adapters.merge_errors(model)[0]["codes_changed"] > 0.5
    assert "codes_changed" not in adapters.merge_errors(trained(use_qlora=False))[0]


@pytest.mark.slow
def test_peft_interop_on_smollm2(tmp_path):
    """The real offline model: PEFT on the plain SmolLM2 reproduces our LoRA-mode logits of an exported adapter."""
    from qlora_tutorial.models import load_model

    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30], [28, 2, 43, 512, 9000, 11, 7]])
    ours = quantize_model(load_model(), MLP, alpha=16, r=8, use_qlora=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in wrapped_layers(ours):
            layer = ours.get_submodule(name)
            layer.W_b.copy_(torch.randn(layer.W_b.shape, generator=g) * 0.01)
    adapters.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    lora = adapters.import_peft(load_model(), tmp_path, use_qlora=False)
    theirs = peft.PeftModel.from_pretrained(load_model(), str(tmp_path)).eval()
    with torch.no_grad():
        a, b, base = lora(input_ids=ids).logits, theirs(input_ids=ids).logits, load_model()(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-3
    assert (a - base).abs().max().item() > 0.1  # the adapter matters
