"""quantize_model and the parameter counts, on real (small random and meta-device) Llama models."""
import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from qlora_tutorial import Qlora_4_bit, count_parameters, print_trainable, quantize_model
from qlora_tutorial.lora import lora_param_count
from qlora_tutorial.quantize import linear_names, lora_parameters, wrapped_layers
from qlora_tutorial.models import build_from_config, tiny_llama, tinyllama_config

MLP = ["gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = MLP + ATTENTION
H, I, LAYERS = 64, 128, 2  # tiny_llama's defaults


def expected_lora(names, r, hidden=H, inter=I, layers=LAYERS, kv=None):
    kv = kv if kv is not None else hidden // 2  # tiny_llama: 4 heads, 2 kv heads
    shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
              "q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden)}
    return layers * sum(lora_param_count(*shapes[n], r) for n in names)


# ---------------------------------------------------------------- wrapping
@pytest.mark.parametrize("targets", [MLP, ATTENTION, ALL], ids=["mlp", "attention", "all"])
@pytest.mark.parametrize("use_qlora", [True, False], ids=["qlora", "lora"])
def test_wraps_exactly_the_named_linears(targets, use_qlora):
    model = tiny_llama()
    _, total_before = count_parameters(model)
    out = quantize_model(model, targets, alpha=4, r=2, use_qlora=use_qlora)
    assert out is model
    wrapped = wrapped_layers(model)
    assert len(wrapped) == LAYERS * len(targets)
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == set(targets)
    assert all(isinstance(m.quant_nn, bnb.nn.Linear4bit) == use_qlora for m in model.modules() if isinstance(m, Qlora_4_bit))
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Qlora_4_bit)
    trainable, total = count_parameters(model)
    assert trainable == expected_lora(targets, r=2)
    assert total == total_before + trainable  # logical counts: quantizing changes no weight count


def test_targets_by_dotted_tail_and_presets():
    from qlora_tutorial.lora import TARGET_PRESETS

    assert set(TARGET_PRESETS["mlp"]) == set(MLP)
    assert set(TARGET_PRESETS["attention"]) == set(ATTENTION)
    assert set(TARGET_PRESETS["all"]) == set(ALL)
    model = quantize_model(tiny_llama(), "all", alpha=4, r=2, use_qlora=False)
    assert len(wrapped_layers(model)) == LAYERS * 7 and not isinstance(model.lm_head, Qlora_4_bit)
    model = quantize_model(tiny_llama(), ["layers.1.mlp.down_proj"], alpha=4, r=2, use_qlora=False)
    assert wrapped_layers(model) == ["model.layers.1.mlp.down_proj"]


def test_lm_head_only_when_named():
    model = quantize_model(tiny_llama(), ["lm_head"], alpha=4, r=2)
    assert wrapped_layers(model) == ["lm_head"]


def test_second_call_wraps_nothing_twice():
    model = quantize_model(tiny_llama(), MLP, alpha=4, r=2)
    before = wrapped_layers(model)
    counts = count_parameters(model)
    layer = model.model.layers[0].mlp.gate_proj
    quantize_model(model, MLP, alpha=4, r=2)
    assert wrapped_layers(model) == before and count_parameters(model) == counts
    assert model.model.layers[0].mlp.gate_proj is layer and not isinstance(layer.quant_nn, Qlora_4_bit)
    # a second call may add other targets
    quantize_model(model, ["q_proj"], alpha=4, r=2)
    assert len(wrapped_layers(model)) == LAYERS * 4
    with pytest.raises(ValueError, match="already a Qlora_4_bit"):
        quantize_model(model, MLP, alpha=8, r=4)


def test_output_at_init_is_the_base_models():
    """W_b = 0, so at init LoRA mode is the original model and QLoRA mode the dequantized one."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = tiny_llama()(ids).logits
    lora = quantize_model(tiny_llama(), ALL, alpha=4, r=2, use_qlora=False)
    assert torch.equal(lora(ids).logits, ref)
    qlora = quantize_model(tiny_llama(), ALL, alpha=4, r=2)
    dequantized = tiny_llama()
    with torch.no_grad():
        for name in wrapped_layers(qlora):
            dequantized.get_submodule(name).weight.copy_(qlora.get_submodule(name).base_weight())
    logits = qlora(ids).logits
    torch.testing.assert_close(logits, dequantized(ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits, ref, atol=1e-3)  # 4 bits do change the outputs


# ---------------------------------------------------------------- freezing and gradients
def test_everything_but_lora_is_frozen_embeddings_included():
    model = tiny_llama()
    quantize_model(model, MLP, alpha=4, r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".W_a", ".W_b")) for n in trainable)
    assert not model.model.embed_tokens.weight.requires_grad
    # the original README's manual freeze is then harmless
    model.model.embed_tokens.weight.requires_grad = False
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    ids = torch.randint(0, 256, (2, 12))
    model(ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_freeze_false_leaves_other_parameters_alone():
    model = quantize_model(tiny_llama(), MLP, alpha=4, r=2, freeze=False)
    assert model.model.embed_tokens.weight.requires_grad


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = quantize_model(tiny_llama(), MLP, alpha=4, r=2).train()
        with torch.no_grad():
            for p in lora_parameters(model):
                p.normal_(0, 0.02)
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.layers[0].gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora_parameters(model)]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


# ---------------------------------------------------------------- counts
def test_packed_numel_is_half_and_count_parameters_corrects_it():
    model = quantize_model(tiny_llama(), MLP, alpha=4, r=2, require_lora=False)
    naive = sum(p.numel() for p in model.parameters())
    _, total = count_parameters(model)
    assert total - naive == LAYERS * 3 * H * I // 2
    assert count_parameters(model)[0] == 0


def test_counts_agree_with_peft():
    ours = quantize_model(tiny_llama(), ALL, alpha=16, r=8, use_qlora=False)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=ALL))
    assert count_parameters(ours) == peft_model.get_nb_trainable_parameters()


def test_print_trainable(capsys):
    model = quantize_model(tiny_llama(), MLP, alpha=4, r=2)
    result = print_trainable(model)
    assert result == count_parameters(model)
    assert capsys.readouterr().out == f"Trainable: {result[0]:,} of {result[1]:,} parameters ({100 * result[0] / result[1]:.3f}%)\n"


def test_tinyllama_readme_example_from_its_config():
    """The original README's example (TinyLlama-1.1B, MLP layers, r=2) counted on the meta device."""
    model = build_from_config(tinyllama_config(), device="meta")
    assert count_parameters(model) == (1_100_048_384, 1_100_048_384)
    quantize_model(model, MLP, alpha=4, r=2)
    trainable, total = count_parameters(model)
    assert trainable == 22 * 2 * (3 * (2048 + 5632)) == 1_013_760  # not the original README's 1,048,576
    assert total == 1_100_048_384 + trainable


# ---------------------------------------------------------------- bad input
def test_unknown_target_lists_the_linear_layers():
    with pytest.raises(ValueError, match=r"\['gate'\].*q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"):
        quantize_model(tiny_llama(), ["gate_proj", "gate"], alpha=4, r=2)


def test_target_that_is_not_a_linear():
    with pytest.raises(TypeError, match="LlamaMLP, not an nn.Linear; name its linear layers instead: gate_proj, up_proj, down_proj"):
        quantize_model(tiny_llama(), ["mlp"], alpha=4, r=2)
    with pytest.raises(TypeError, match="Embedding, not an nn.Linear"):
        quantize_model(tiny_llama(), ["embed_tokens"], alpha=4, r=2)


@pytest.mark.parametrize("targets", [[], ()])
def test_empty_targets(targets):
    with pytest.raises(ValueError, match="is empty: name at least one layer"):
        quantize_model(tiny_llama(), targets, alpha=4, r=2)


@pytest.mark.parametrize("targets", [[""], [None]])
def test_blank_target_names(targets):
    with pytest.raises(ValueError, match="non-empty layer name"):
        quantize_model(tiny_llama(), targets, alpha=4, r=2)


@pytest.mark.parametrize("r, alpha", [(0, 4), (-1, 4), (2, 0), (2, -4)])
def test_rank_and_alpha_must_be_positive(r, alpha):
    model = tiny_llama()
    with pytest.raises(ValueError, match="must be a positive"):
        quantize_model(model, MLP, alpha=alpha, r=r)
    assert not wrapped_layers(model)  # nothing was changed before the error


def test_model_already_quantized_by_transformers():
    model = tiny_llama()
    q = bnb.nn.Linear4bit(H, I, bias=False)
    model.model.layers[0].mlp.gate_proj = q
    with pytest.raises(ValueError, match=r"bitsandbytes-quantized layers \(model.layers.0.mlp.gate_proj\).*quantization_config"):
        quantize_model(model, ["up_proj"], alpha=4, r=2)
    model = tiny_llama()
    model.is_loaded_in_4bit = True
    with pytest.raises(ValueError, match="loaded already quantized"):
        quantize_model(model, MLP, alpha=4, r=2)


def test_tied_lm_head_is_refused():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied embeddings"):
        quantize_model(model, ["lm_head"], alpha=4, r=2)


def test_not_a_module():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        quantize_model({"gate_proj": 1}, MLP, alpha=4, r=2)


def test_linear_names():
    model = quantize_model(tiny_llama(), MLP, alpha=4, r=2)
    assert linear_names(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
