"""The variants: an 8-bit base (layer.Base8bit), DoRA (lora.dora_*) and LoRA+ (variants), each against PEFT's
implementation."""
import copy
import tempfile

import peft
from peft.optimizers import create_loraplus_optimizer
import pytest
import torch
from torch import nn

from qlora_tutorial import adapters, memory
from qlora_tutorial.layer import Base8bit, Qlora_4_bit
from qlora_tutorial.models import tiny_llama
from qlora_tutorial.quantize import quantize_model, wrapped_layers
from qlora_tutorial.variants import loraplus_optimizer, loraplus_param_groups

from .helpers import fails_and_changes_nothing

TARGETS = ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]
IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 250]])


def randomize_lora(model, seed=0, dora_scale=0.1):
    """Non-zero B (as after training) and, for DoRA, a magnitude moved off its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "W_b" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "magnitude" in name:
                p.mul_(1 + dora_scale * torch.randn(p.shape, generator=g))


def copy_ours_into_peft(ours, theirs):
    """Give a PEFT model exactly our W_a, W_b (transposed) and magnitudes."""
    with torch.no_grad():
        for name in wrapped_layers(ours):
            layer = ours.get_submodule(name)
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.W_a.T)
            peft_layer.lora_B["default"].weight.copy_(layer.W_b.T)
            if layer.use_dora:
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


def train_side_by_side(pairs, steps=3):
    """A few optimizer steps of each (model, optimizer) on the same batch."""
    for _ in range(steps):
        for model, opt in pairs:
            opt.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()


def peft_twin(ours, base, use_dora):
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                                       use_dora=use_dora))
    copy_ours_into_peft(ours, theirs)
    return theirs


def grads(model, key):
    """{layer: gradient} of one kind of adapter tensor, in our layout."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if key == "A" and ("W_a" in name or "lora_A" in name):
            out[name.split(".W_a")[0].split(".lora_A")[0].replace("base_model.model.", "")] = (
                p.grad.T if "lora_A" in name else p.grad)
        if key == "m" and "magnitude" in name:
            out[name.split(".magnitude")[0].split(".lora_magnitude_vector")[0].replace("base_model.model.", "")] = p.grad
    return out


# ---------------------------------------------------------------- DoRA
def test_dora_magnitude_starts_at_the_row_norms_as_in_peft():
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False, use_dora=True)
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                     use_dora=True))
    for name in wrapped_layers(ours):
        m = ours.get_submodule(name).magnitude
        assert torch.equal(m, theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight)
        assert torch.equal(m, torch.linalg.norm(ours.get_submodule(name).quant_nn.weight, dim=1))
    # with W_b = 0 at the start, DoRA's layer is exactly the base layer
    assert torch.equal(ours(input_ids=IDS).logits, tiny_llama(seed=0)(input_ids=IDS).logits)


def test_dora_logits_and_gradients_match_peft():
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False, use_dora=True)
    randomize_lora(ours)
    theirs = peft_twin(ours, tiny_llama(seed=0), use_dora=True)
    a, b = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    assert (a - b).abs().max().item() < 1e-5
    a.square().mean().backward()
    b.square().mean().backward()
    for key in ("A", "m"):
        g_ours, g_theirs = grads(ours, key), grads(theirs, key)
        assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 2 * len(TARGETS)
        for name in g_ours:
            scale = g_theirs[name].abs().max().item()
            assert (g_ours[name] - g_theirs[name]).abs().max().item() <= 1e-4 * scale, (key, name)


def test_dora_on_a_4bit_base_equals_peft_on_the_dequantized_weights():
    """QLoRA + DoRA computes with the NF4 weight: PEFT on a model holding those dequantized weights agrees."""
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=True, use_dora=True)
    randomize_lora(ours)
    dequantized = tiny_llama(seed=0)
    with torch.no_grad():
        for name in wrapped_layers(ours):
            dequantized.get_submodule(name).weight.copy_(ours.get_submodule(name).base_weight())
    theirs = peft_twin(ours, dequantized, use_dora=True)
    assert (ours(input_ids=IDS).logits - theirs(input_ids=IDS).logits).abs().max().item() < 1e-5


def test_dora_trains_like_peft_for_three_adamw_steps():
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False, use_dora=True)
    randomize_lora(ours)
    theirs = peft_twin(ours, tiny_llama(seed=0), use_dora=True)
    train_side_by_side([(m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3))
                        for m in (ours, theirs)])
    for name in wrapped_layers(ours):
        layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        assert (layer.W_b - peft_layer.lora_B["default"].weight.T).abs().max().item() < 1e-5
        assert (layer.magnitude - peft_layer.lora_magnitude_vector["default"].weight).abs().max().item() < 1e-5


def test_dora_merge_and_adapter_round_trips(tmp_path):
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False, use_dora=True)
    randomize_lora(ours)
    expected = ours(input_ids=IDS).logits
    # our format: bit-exact, magnitudes included
    adapters.save_adapter(ours, tmp_path / "ours")
    back = adapters.load_adapter(tiny_llama(seed=0), tmp_path / "ours")
    assert torch.equal(back(input_ids=IDS).logits, expected)
    # PEFT's format, read by PEFT
    adapters.export_peft(ours, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "peft")).eval()
    assert (theirs(input_ids=IDS).logits - expected).abs().max().item() < 1e-5
    # merged into plain layers: the same function
    merged = adapters.merge(ours)
    assert not wrapped_layers(merged)
    assert (merged(input_ids=IDS).logits - expected).abs().max().item() < 1e-5


def test_dora_adapter_refuses_a_model_wrapped_without_dora(tmp_path):
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False, use_dora=True)
    adapters.save_adapter(ours, tmp_path)
    plain = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False)
    fails_and_changes_nothing(plain, lambda: adapters.load_adapter(plain, tmp_path), "DoRA adapter")


@pytest.mark.parametrize("kwargs", [dict(blocksize=128), dict(compute_dtype=torch.bfloat16)])
def test_int8_refuses_the_4bit_only_settings(kwargs):
    with pytest.raises(ValueError, match="apply to 4-bit bases only"):
        Qlora_4_bit.from_linear(nn.Linear(64, 32), 8, 4, quant_type="int8", **kwargs)
    model = tiny_llama(seed=0)
    fails_and_changes_nothing(model, lambda: quantize_model(model, TARGETS, 8, 4, quant_type="int8", **kwargs),
                              "apply to 4-bit bases only")


def test_dora_needs_the_lora_matrices():
    with pytest.raises(ValueError, match="use_dora=True needs"):
        Qlora_4_bit.from_linear(nn.Linear(64, 32), 8, 4, require_lora=False, use_dora=True)
    model = tiny_llama(seed=0)
    fails_and_changes_nothing(model, lambda: quantize_model(model, TARGETS, 8, 4, require_lora=False, use_dora=True),
                              "use_dora=True needs the LoRA matrices")


# ---------------------------------------------------------------- 8-bit base
def test_int8_base_holds_bitsandbytes_codes_and_row_scales():
    torch.manual_seed(0)
    linear = nn.Linear(200, 96)  # 200: not a multiple of any blocksize; LLM.int8 has none
    layer = Qlora_4_bit.from_linear(copy.deepcopy(linear), 8, 4, quant_type="int8")
    assert layer.is_int8 and not layer.is_quantized and layer.quant_nn.weight.dtype == torch.int8
    # bitsandbytes rounds the weight to float16 first, then takes one absmax per row (kept in float32)
    half = linear.weight.detach().half().float()
    scales = half.abs().amax(dim=1)
    assert torch.equal(layer.quant_nn.weight.SCB, scales)
    codes = torch.round(half * (127 / scales.unsqueeze(1))).to(torch.int8)
    assert torch.equal(layer.quant_nn.weight.data, codes)
    # so the dense weight it stands for is within half a step (absmax / 254) of the float16 weight
    err = (layer.base_weight() - half).abs()
    assert (err <= scales.unsqueeze(1) / 254 * (1 + 1e-4)).all()  # 1e-4: float32 rounding of codes * scale
    assert layer.base_weight().dtype == torch.float32


def test_int8_forward_and_gradients_match_peft_on_the_same_bitsandbytes_layer():
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, quant_type="int8")
    randomize_lora(ours)
    base = tiny_llama(seed=0)
    for name in wrapped_layers(ours):  # PEFT's LoRA on bitsandbytes' Linear8bitLt, from the same weights
        parent, _, attr = name.rpartition(".")
        setattr(base.get_submodule(parent), attr, Base8bit.quantize(base.get_submodule(name)))
    base.is_loaded_in_8bit = True  # what transformers sets; PEFT then wraps with its bitsandbytes LoRA layer
    theirs = peft_twin(ours, base, use_dora=False)
    assert type(theirs.base_model.model.get_submodule("model.layers.0.mlp.gate_proj")).__module__ == "peft.tuners.lora.bnb"
    a, b = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    assert (a - b).abs().max().item() < 1e-5
    a.square().mean().backward()
    b.square().mean().backward()
    g_ours, g_theirs = grads(ours, "A"), grads(theirs, "A")
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 2 * len(TARGETS)
    for name in g_ours:
        assert (g_ours[name] - g_theirs[name]).abs().max().item() <= 1e-4 * g_theirs[name].abs().max().item()


def test_int8_weights_take_a_byte_each_plus_a_scale_per_row():
    linear = nn.Linear(128, 64)
    layer = Qlora_4_bit.from_linear(linear, 8, 4, quant_type="int8", require_lora=False)
    assert memory.weight_bytes(layer) == 128 * 64 + 4 * 64 + 4 * 64  # codes, row scales, float32 bias


def test_int8_model_merges_and_round_trips_its_adapter(tmp_path):
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, quant_type="int8")
    randomize_lora(ours)
    expected = ours(input_ids=IDS).logits
    adapters.save_adapter(ours, tmp_path)
    back = adapters.load_adapter(quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, quant_type="int8"), tmp_path)
    assert torch.equal(back(input_ids=IDS).logits, expected)
    merged = adapters.merge(ours)
    assert merged.model.layers[0].mlp.gate_proj.weight.dtype == torch.float32
    assert (merged(input_ids=IDS).logits - expected).abs().max().item() < 1e-4
    again = adapters.merge(back, requantize=True)
    assert again.get_submodule("model.layers.0.mlp.gate_proj").is_int8


# ---------------------------------------------------------------- LoRA+
def test_loraplus_groups_match_peft_and_train_the_same():
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False)
    randomize_lora(ours)
    theirs = peft_twin(ours, tiny_llama(seed=0), use_dora=False)
    opt_ours = torch.optim.AdamW(loraplus_param_groups(ours, lr=1e-3, ratio=16), lr=1e-3)
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    lrs = lambda opt: sorted((g["lr"], len(g["params"])) for g in opt.param_groups if g["params"])
    assert lrs(opt_ours) == lrs(opt_theirs) == [(1e-3, len(TARGETS) * 2), (16e-3, len(TARGETS) * 2)]
    train_side_by_side([(ours, opt_ours), (theirs, opt_theirs)])
    for name in wrapped_layers(ours):
        layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        # Adam moves each entry by about lr per step (3 steps: 3e-3 for A, 4.8e-2 for B); the two
        # implementations differ only by float rounding in the gradients (transposed layouts)
        assert (layer.W_a - peft_layer.lora_A["default"].weight.T).abs().max().item() < 1e-5
        assert (layer.W_b - peft_layer.lora_B["default"].weight.T).abs().max().item() < 1e-4


def test_loraplus_puts_doras_magnitude_with_b_like_peft():
    ours = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False, use_dora=True)
    groups = loraplus_param_groups(ours, lr=1e-4, ratio=8, weight_decay=0.01)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (1e-4, 0.01, 10), (8e-4, 0.01, 10), (8e-4, 0.0, 10)]


def test_the_trainer_takes_the_loraplus_optimizer():
    from datasets import Dataset

    from qlora_tutorial.device import Runtime
    from qlora_tutorial.train import make_trainer, training_arguments

    model = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False)
    data = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4)
    with tempfile.TemporaryDirectory() as tmp:
        # on the CPU the Trainer's optimizer is torch's AdamW (on a GPU, bitsandbytes' paged AdamW)
        args = training_arguments(tmp, Runtime(torch.device("cpu"), torch.float32), learning_rate=2e-4, max_steps=1,
                                  weight_decay=0.0)
        trainer = make_trainer(model, args, data, pad_token_id=0, optimizers=loraplus_optimizer(model, args, 16))
        opt = trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 2e-4 * 16, 2e-4 * 16]


@pytest.mark.parametrize("kwargs, message", [(dict(lr=1e-3, ratio=0.5), "ratio"), (dict(lr=0, ratio=16), "lr must be")])
def test_loraplus_bad_arguments(kwargs, message):
    model = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, use_qlora=False)
    with pytest.raises(ValueError, match=message):
        loraplus_param_groups(model, **kwargs)
    with pytest.raises(ValueError, match="no trainable W_b"):
        loraplus_param_groups(tiny_llama(seed=0), lr=1e-3)


@pytest.mark.parametrize("kwargs", [dict(quant_type="int8"), dict(use_dora=True)])
def test_whole_model_save_quantized_round_trip(tmp_path, kwargs):
    model = quantize_model(tiny_llama(seed=0), TARGETS, alpha=8, r=4, **kwargs)
    randomize_lora(model)
    adapters.save_quantized(model, tmp_path)
    back = adapters.load_quantized(tiny_llama(seed=1), tmp_path)  # other weights: everything comes from the file
    assert torch.equal(back(input_ids=IDS).logits, model(input_ids=IDS).logits)
