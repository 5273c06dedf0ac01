"""qlora_tutorial.lora against brute force and against PEFT (the real library, not a mock)."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from qlora_tutorial import lora
from qlora_tutorial.models import build_from_config, llama7b_config, tiny_llama, tinyllama_config


def peft_linear(in_features, out_features, r, alpha, rslora=False, seed=0):
    """A PEFT LoRA layer around one nn.Linear, with a non-zero B so the update is not trivially 0."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_rslora=rslora))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return model, layer


def ours_from_peft(layer):
    """PEFT's lora_A.weight is (r, in) = W_a.T and lora_B.weight is (out, r) = W_b.T."""
    return layer.lora_A["default"].weight.detach().T, layer.lora_B["default"].weight.detach().T


# ---------------------------------------------------------------- scale
@pytest.mark.parametrize("r,alpha", [(1, 1), (2, 4), (8, 16), (16, 8), (64, 16)])
@pytest.mark.parametrize("rslora", [False, True])
def test_scale_matches_peft(r, alpha, rslora):
    _, layer = peft_linear(12, 10, r, alpha, rslora)
    assert lora.lora_scale(alpha, r, rslora) == pytest.approx(layer.scaling["default"], rel=1e-12)
    assert lora.lora_scale(alpha, r, rslora) == pytest.approx(alpha / (math.sqrt(r) if rslora else r))


@pytest.mark.parametrize("r", [0, -1, 2.0, True, "8", None])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        lora.lora_scale(16, r)


@pytest.mark.parametrize("alpha", [0, -2, float("nan"), float("inf"), "16", True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        lora.lora_scale(alpha, 8)


# ---------------------------------------------------------------- init
def test_init_distribution_bound_is_one_over_sqrt_in():
    fan_in, r = 1536, 64
    W_a, W_b = torch.full((fan_in, r), 99.0), torch.full((r, 576), 99.0)
    torch.manual_seed(0)
    lora.init_lora_(W_a, W_b)
    bound = 1 / math.sqrt(fan_in)
    assert lora.kaiming_bound(fan_in) == pytest.approx(bound, rel=1e-12)
    assert torch.count_nonzero(W_b) == 0
    assert W_a.abs().max() <= bound
    assert W_a.abs().max() > 0.999 * bound  # 98,304 draws reach the edge
    # Uniform(-b, b): mean 0, std b / sqrt(3), each quartile of [-b, b] holds a quarter of the draws.
    assert W_a.mean().abs() < 0.01 * bound
    assert W_a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    edges = torch.linspace(-bound, bound, 5)
    counts = torch.histc(W_a, bins=4, min=-bound, max=bound)
    assert torch.allclose(counts / W_a.numel(), torch.full((4,), 0.25), atol=0.01), (edges, counts)


def test_init_matches_peft_distribution():
    """PEFT's lora_A (drawn on its own (r, in) tensor) has the same bound and spread as our W_a."""
    _, layer = peft_linear(1024, 256, r=32, alpha=64)
    A = layer.lora_A["default"].weight.detach()
    assert A.shape == (32, 1024)
    W_a, W_b = torch.empty(1024, 32), torch.empty(32, 256)
    torch.manual_seed(1)
    lora.init_lora_(W_a, W_b)
    bound = lora.kaiming_bound(1024)
    assert A.abs().max() <= bound and W_a.abs().max() <= bound
    assert W_a.std().item() == pytest.approx(A.std().item(), rel=0.03)


def test_kaiming_on_in_by_r_tensor_is_the_trap():
    """What init_lora_ avoids: kaiming_uniform_ on (in, r) takes fan_in = r, a bound sqrt(in / r) times larger."""
    fan_in, r = 1536, 8
    wrong = torch.empty(fan_in, r)
    torch.manual_seed(0)
    nn.init.kaiming_uniform_(wrong, a=math.sqrt(5))
    assert wrong.abs().max() > 10 * lora.kaiming_bound(fan_in)
    assert wrong.abs().max() <= lora.kaiming_bound(r)
    assert wrong.std().item() / (lora.kaiming_bound(fan_in) / math.sqrt(3)) == pytest.approx(math.sqrt(fan_in / r), rel=0.1)


def test_init_starts_exactly_at_the_base_output():
    torch.manual_seed(0)
    x = torch.randn(5, 40)
    W_a, W_b = torch.empty(40, 4), torch.empty(4, 30)
    lora.init_lora_(W_a, W_b)
    assert torch.equal(lora.lora_forward(x, W_a, W_b, 2.0), torch.zeros(5, 30))


def test_init_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not share the rank"):
        lora.init_lora_(torch.empty(40, 4), torch.empty(5, 30))


@pytest.mark.parametrize("fan_in", [0, -3, 2.5])
def test_kaiming_bound_rejects_bad_fan_in(fan_in):
    with pytest.raises(ValueError, match="fan_in"):
        lora.kaiming_bound(fan_in)


# ---------------------------------------------------------------- the update, against PEFT
@pytest.mark.parametrize("rslora", [False, True])
def test_delta_weight_and_forward_match_peft(rslora):
    model, layer = peft_linear(24, 18, r=4, alpha=8, rslora=rslora)
    W_a, W_b = ours_from_peft(layer)
    s = lora.lora_scale(8, 4, rslora)
    expected = layer.get_delta_weight("default")
    assert lora.delta_weight(W_a, W_b, s).shape == (18, 24)
    assert torch.allclose(lora.delta_weight(W_a, W_b, s), expected, atol=1e-6)
    # Brute force: s * sum over the rank of outer products b_k a_k^T.
    outer = s * sum(torch.outer(W_b[k], W_a[:, k]) for k in range(4))
    assert torch.allclose(lora.delta_weight(W_a, W_b, s), outer, atol=1e-6)
    x = torch.randn(7, 24)
    with torch.no_grad():
        peft_out = model(x)
        base_out = layer.base_layer(x)
    assert torch.allclose(base_out + lora.lora_forward(x, W_a, W_b, s), peft_out, atol=1e-5)


def test_lora_forward_casts_adapters_to_input_dtype():
    W_a, W_b = torch.randn(8, 2), torch.randn(2, 6)
    out = lora.lora_forward(torch.randn(3, 8, dtype=torch.bfloat16), W_a, W_b, 1.0)
    assert out.dtype == torch.bfloat16


def test_lora_forward_rejects_wrong_width():
    with pytest.raises(ValueError, match="input has 9 features"):
        lora.lora_forward(torch.randn(3, 9), torch.randn(8, 2), torch.randn(2, 6), 1.0)


def test_merge_matches_peft_and_round_trips():
    model, layer = peft_linear(32, 20, r=4, alpha=8)
    W0 = layer.base_layer.weight.detach().clone()
    W_a, W_b = ours_from_peft(layer)
    ours = lora.merge_weight(W0, W_a, W_b, lora.lora_scale(8, 4))
    merged = model.merge_and_unload()
    assert torch.allclose(ours, merged[0].weight.detach(), atol=1e-6)
    back = lora.unmerge_weight(ours, W_a, W_b, lora.lora_scale(8, 4))
    assert (back - W0).abs().max() < 1e-5
    assert not torch.equal(ours, W0)


def test_merge_keeps_dtype_and_rounds_in_it():
    torch.manual_seed(0)
    W0 = torch.randn(64, 48).to(torch.bfloat16)
    W_a, W_b = torch.randn(48, 4) * 0.1, torch.randn(4, 64) * 0.1
    merged = lora.merge_weight(W0, W_a, W_b, 2.0)
    assert merged.dtype == torch.bfloat16
    back = lora.unmerge_weight(merged, W_a, W_b, 2.0)
    err = (back.float() - W0.float()).abs().max().item()
    assert 0 < err < 0.1  # bf16 rounding: not exact, but small


def test_merge_rejects_wrong_shape():
    with pytest.raises(ValueError, match="expected \\(out, in\\) = \\(6, 8\\)"):
        lora.merge_weight(torch.zeros(8, 6), torch.randn(8, 2), torch.randn(2, 6), 1.0)


# ---------------------------------------------------------------- rank energy / low-rank factors
def test_rank_energy_of_known_spectrum():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(30, 30))
    V, _ = torch.linalg.qr(torch.randn(20, 20))
    S = torch.tensor([4.0, 3.0, 2.0, 1.0] + [0.0] * 16)
    delta = U[:, :20] @ torch.diag(S) @ V.T
    e = lora.rank_energy(delta)
    assert e.shape == (20,)
    assert torch.allclose(e[:4], torch.tensor([16, 25, 29, 30]) / 30.0, atol=1e-5)
    assert torch.allclose(e[4:], torch.ones(16), atol=1e-5)


def test_low_rank_factors_are_the_best_rank_r_approximation():
    torch.manual_seed(0)
    delta = torch.randn(40, 24)
    e = lora.rank_energy(delta)
    for r in (1, 5, 24):
        W_a, W_b = lora.low_rank_factors(delta, r, scale=2.0)
        assert W_a.shape == (24, r) and W_b.shape == (r, 40)
        approx = lora.delta_weight(W_a, W_b, 2.0)
        kept = 1 - ((delta - approx).norm() ** 2 / delta.norm() ** 2).item()
        assert kept == pytest.approx(e[r - 1].item(), abs=1e-4)
        assert torch.linalg.matrix_rank(approx) == r
    with pytest.raises(ValueError, match="exceeds min"):
        lora.low_rank_factors(delta, 25)
    with pytest.raises(ValueError, match="all zeros"):
        lora.rank_energy(torch.zeros(3, 4))


# ---------------------------------------------------------------- counting
def test_param_count_is_numel_of_peft_matrices():
    _, layer = peft_linear(96, 40, r=6, alpha=12)
    numel = layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel()
    assert lora.lora_param_count(96, 40, 6) == numel == 6 * (96 + 40)


def test_presets_name_real_llama_layers():
    names = {q.rsplit(".", 1)[-1] for q, m in tiny_llama().named_modules() if isinstance(m, nn.Linear)}
    for preset in lora.TARGET_PRESETS.values():
        assert set(preset) <= names
    assert set(lora.TARGET_PRESETS["all"]) == set(lora.TARGET_PRESETS["mlp"]) | set(lora.TARGET_PRESETS["attention"])
    assert "lm_head" not in lora.TARGET_PRESETS["all"]


@pytest.mark.parametrize("preset", ["mlp", "attention", "all"])
@pytest.mark.parametrize("r", [1, 4])
def test_count_matches_peft_on_tiny_llama(preset, r):
    """Brute force: PEFT adds real lora_A / lora_B tensors; summing their numel must give our count."""
    ours = lora.count_lora_params(tiny_llama(), preset, r)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=2 * r,
                                                         target_modules=list(lora.TARGET_PRESETS[preset])))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    numel = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert ours == trainable == numel


def test_count_on_meta_tinyllama_matches_peft_and_formula():
    config = tinyllama_config()
    model = build_from_config(config, device="meta")
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    assert lora.count_lora_params(model, "mlp", 2) == L * 2 * 3 * (h + i) == 1_013_760
    assert lora.count_lora_params(model, "attention", 8) == L * 8 * (6 * h + 2 * kv)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(lora.TARGET_PRESETS["all"])))
    assert peft_model.get_nb_trainable_parameters()[0] == lora.count_lora_params(
        build_from_config(config, device="meta"), "all", 8)


def test_count_llama7b_closed_form():
    config = llama7b_config()
    model = build_from_config(config, device="meta")
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    assert kv == h  # Llama-2-7B has no grouped-query attention
    # q, o: h -> h;  k, v: h -> kv;  gate, up: h -> i;  down: i -> h
    assert lora.count_lora_params(model, "all", 16) == L * 16 * (9 * h + 2 * kv + 3 * i) == 39_976_960


def test_targets_accept_names_tails_and_presets():
    model = tiny_llama()
    assert lora.count_lora_params(model, ["gate_proj", "up_proj", "down_proj"], 3) == lora.count_lora_params(model, "mlp", 3)
    only_first = lora.lora_targets(model, ["layers.0.mlp.down_proj"])
    assert [q for q, _ in only_first] == ["model.layers.0.mlp.down_proj"]
    assert lora.count_lora_params(model, "lm_head", 2) == 2 * (64 + 256)


def test_unknown_target_lists_the_layers_that_exist():
    with pytest.raises(ValueError, match=r"'gate' matches no nn.Linear.*'down_proj'.*'lm_head'"):
        lora.count_lora_params(tiny_llama(), ["gate"], 2)
    with pytest.raises(ValueError, match="targets is empty"):
        lora.count_lora_params(tiny_llama(), [], 2)
    with pytest.raises(TypeError, match="preset name"):
        lora.count_lora_params(tiny_llama(), 7, 2)
    with pytest.raises(ValueError, match="rank r"):
        lora.count_lora_params(tiny_llama(), "mlp", 0)


def test_resolve_target_names():
    assert lora.resolve_target_names("mlp") == ("gate_proj", "up_proj", "down_proj")
    assert lora.resolve_target_names("q_proj") == ("q_proj",)
    assert lora.resolve_target_names(["q_proj", "mlp.up_proj"]) == ("q_proj", "mlp.up_proj")
    with pytest.raises(ValueError, match="non-empty layer name"):
        lora.resolve_target_names(["q_proj", ""])
    with pytest.raises(ValueError, match="non-empty layer name"):
        lora.resolve_target_names([3])
    assert lora.target_matches("model.layers.0.mlp.up_proj", "up_proj")
    assert lora.target_matches("model.layers.0.mlp.up_proj", "mlp.up_proj")
    assert not lora.target_matches("model.layers.0.mlp.up_proj", "p_proj")  # a dotted tail, not a suffix
