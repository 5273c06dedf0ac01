"""AdaLoRA (qlora_tutorial.adalora) against PEFT's AdaLoraModel: the same start, loss, gradients, rank
pattern after training, and the same files; the Trainer callback; merging; every refused call.

PEFT's twin is always built with task_type="CAUSAL_LM": without a task type ``get_peft_model`` returns
a plain ``PeftModel``, whose forward skips ``AdaLoraModel.forward`` and with it the orthogonality term.
Models are built before seeding (``tiny_llama`` reseeds), so the same seed gives both sides the same
stream for the adapters.
"""
import bitsandbytes as bnb
import peft
import pytest
import torch

from qlora_tutorial import adalora as A
from qlora_tutorial import adapters, quantize_model
from qlora_tutorial.adapters.folder import read_folder
from qlora_tutorial.models import tiny_llama

from .helpers import assert_unchanged, fails_and_changes_nothing, snapshot

pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is the fastest, and on a busy 2-core machine two threads
    waiting on each other made a 16-step run take 40 s instead of 0.3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
# 16 steps: no pruning up to step 2, the budget falls from 4 to 2 per layer until step 12 (masking at
# steps 4, 6, 8, 10), is fixed at step 12 and applied again at steps 13-15.
SCHEDULE = dict(init_r=4, target_r=2, total_step=16, tinit=2, tfinal=4, deltaT=2)
IDS = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))


def ours_and_peft(use_qlora=False, seed=1, **schedule):
    """Our AdaLoRA model and PEFT's on the same tiny Llama, built from the same seed. In 4-bit mode PEFT
    wraps bitsandbytes' Linear4bit layers quantized from the same weights (its SVDLinear4bit)."""
    schedule = {**SCHEDULE, **schedule}
    plain, base = tiny_llama(seed=0), tiny_llama(seed=0)
    if use_qlora:
        for name, linear in [(n, m) for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.load_state_dict(linear.state_dict())
            q = q.to("cpu")  # bitsandbytes quantizes here
            q.support_avx512bf16_for_cpu = False
            parent, _, attr = name.rpartition(".")
            setattr(base.get_submodule(parent), attr, q)
        base.is_loaded_in_4bit = True  # what transformers sets; PEFT then picks SVDLinear4bit
    kwargs = dict(compute_dtype=torch.float32) if use_qlora else {}
    torch.manual_seed(seed)
    ours = A.adalora_model(plain, TARGETS, alpha=8, use_qlora=use_qlora, **kwargs, **schedule)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(base, peft.AdaLoraConfig(target_modules=TARGETS, lora_alpha=8, lora_dropout=0.0,
                                                          task_type="CAUSAL_LM", **schedule))
    return ours, theirs


def peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


def triplet_diff(ours, theirs) -> float:
    """Largest |difference| over all W_a / E / W_b and PEFT's lora_A.T / lora_E / lora_B.T."""
    worst = 0.0
    for name, layer in A.adalora_layers(ours).items():
        p = peft_layer(theirs, name)
        for mine, other in ((layer.W_a, p.lora_A["default"].T), (layer.E, p.lora_E["default"].view(-1)),
                            (layer.W_b, p.lora_B["default"].T)):
            worst = max(worst, (mine - other).abs().max().item())
    return worst


def set_E(ours, theirs=None, seed=3):
    """Non-zero singular values (as after training), the same on both sides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in A.adalora_layers(ours).items():
            layer.E.copy_(torch.randn(layer.E.shape, generator=g) * 0.5)
            if theirs is not None:
                peft_layer(theirs, name).lora_E["default"].copy_(layer.E.view(-1, 1))


def train_side_by_side(ours, theirs, steps=16, lr=2e-2):
    """PEFT's documented loop on both: backward, optimizer step, update_and_allocate(step), zero_grad."""
    ours.train(), theirs.train()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (ours, theirs)]
    losses = []
    for step in range(steps):
        pair = []
        for model, opt in zip((ours, theirs), opts):
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            opt.step()
            if model is ours:
                A.update_and_allocate(ours, step)
            else:
                theirs.base_model.update_and_allocate(step)
            opt.zero_grad()
            pair.append(loss.item())
        losses.append(pair)
    return losses


def peft_rank_pattern(theirs):
    """PEFT's rank pattern keyed by layer ("<layer>.lora_E.default" in memory, "<layer>.lora_E" once saved)."""
    pattern = theirs.peft_config["default"].rank_pattern
    return {k.removesuffix(".default").removesuffix(".lora_E"): v for k, v in pattern.items()}


def rank_patterns_after_training(use_qlora=False):
    """(ours, PEFT's) rank pattern after the same 16-step run, keyed by layer, and the largest parameter
    gap (what /tmp/adalora_pattern.py prints)."""
    ours, theirs = ours_and_peft(use_qlora)
    train_side_by_side(ours, theirs)
    return A.rank_pattern(ours), peft_rank_pattern(theirs), triplet_diff(ours, theirs)


def trained_ours(use_qlora=False, steps=16):
    """Our model after the 16-step run (alone), its final rank pattern fixed."""
    plain = tiny_llama(seed=0)
    torch.manual_seed(1)
    model = A.adalora_model(plain, TARGETS, alpha=8, use_qlora=use_qlora, **SCHEDULE).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        A.update_and_allocate(model, step)
        opt.zero_grad()
    return model.eval()


# ---------------------------------------------------------------- the same start as PEFT
def test_init_is_peft_bit_for_bit_and_the_model_starts_as_its_base():
    ours, theirs = ours_and_peft(use_qlora=False)
    assert len(A.adalora_layers(ours)) == 2 * len(TARGETS)
    assert triplet_diff(ours, theirs) == 0.0  # same draws, same order: exactly equal
    layer = ours.get_submodule("model.layers.0.mlp.gate_proj")
    assert layer.W_a.shape == (64, 4) and layer.E.shape == (4,) and layer.W_b.shape == (4, 128)
    assert torch.all(layer.E == 0) and 0.015 < layer.W_a.std().item() < 0.025  # N(0, 0.02^2), 256 draws
    # E = 0: the branch adds exact zeros
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, tiny_llama(seed=0)(input_ids=IDS).logits)
    trainable = {n.rsplit(".", 1)[-1] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"W_a", "E", "W_b"}


def test_on_a_4bit_base_it_starts_as_peft_on_bitsandbytes_linear4bit():
    ours, theirs = ours_and_peft(use_qlora=True)
    for name, layer in A.adalora_layers(ours).items():
        base = peft_layer(theirs, name).base_layer
        assert type(peft_layer(theirs, name)).__name__ == "SVDLinear4bit"
        assert torch.equal(layer.quant_nn.weight.data, base.weight.data)  # the same NF4 bytes
        assert torch.equal(layer.base_weight(), bnb.functional.dequantize_4bit(base.weight.data,
                                                                               base.weight.quant_state))
    assert triplet_diff(ours, theirs) == 0.0
    set_E(ours, theirs)
    with torch.no_grad():
        a, b = ours(input_ids=IDS, labels=IDS), theirs(input_ids=IDS, labels=IDS)
    # our 4-bit matmul (dequantize, then matmul) against bitsandbytes' CPU kernel: float32 rounding,
    # measured 1.5e-7 on the logits and 0 on the loss; bound 1e-5
    assert (a.logits - b.logits).abs().max().item() < 1e-5
    assert abs(a.loss.item() - b.loss.item()) < 1e-5


# ---------------------------------------------------------------- loss and gradients
def test_loss_with_the_orthogonality_term_and_gradients_match_peft():
    ours, theirs = ours_and_peft(use_qlora=False)
    set_E(ours, theirs)
    ours.train(), theirs.train()
    a, b = ours(input_ids=IDS, labels=IDS).loss, theirs(input_ids=IDS, labels=IDS).loss
    # the penalty: mean over the 20 matrices of ||Q Q^T - I||_F, ||P^T P - I||_F (not squared); with
    # entries ~ N(0, 0.02^2) the Gram matrices are near 0, so each norm is near ||I||_F = sqrt(4) = 2
    reg = A.orth_regularization(ours)
    assert 1.8 < reg.item() < 2.0
    with torch.no_grad():
        plain = ours(input_ids=IDS).logits  # no labels: no loss, no penalty
        ce = torch.nn.functional.cross_entropy(plain[:, :-1].reshape(-1, 256), IDS[:, 1:].reshape(-1))
    assert abs(a.item() - (ce.item() + 0.5 * reg.item())) < 1e-5
    # float32, the same operations on other memory layouts (our W_a is PEFT's lora_A transposed):
    # measured 9.5e-7, two units in the last place of 6.5; bound 5e-6
    assert abs(a.item() - b.item()) <= 5e-6
    a.backward(), b.backward()
    for name, layer in A.adalora_layers(ours).items():
        p = peft_layer(theirs, name)
        for mine, other in ((layer.W_a.grad, p.lora_A["default"].grad.T),
                            (layer.E.grad, p.lora_E["default"].grad.view(-1)),
                            (layer.W_b.grad, p.lora_B["default"].grad.T)):
            # float32 rounding of the same sums taken in other orders: measured 2.1e-6 of the largest
            # gradient of the tensor; bound 1e-5
            assert (mine - other).abs().max().item() <= 1e-5 * other.abs().max().item(), name


# ---------------------------------------------------------------- training and the rank pattern
@pytest.mark.parametrize("use_qlora", [False, True])
def test_sixteen_steps_prune_to_the_same_rank_pattern_as_peft(use_qlora):
    ours, theirs = ours_and_peft(use_qlora)
    losses = train_side_by_side(ours, theirs)
    for mine, other in losses:
        assert abs(mine - other) <= 5e-6  # measured at most 9.5e-7 (two units in the last place); bound 5e-6
    pattern = A.rank_pattern(ours)
    assert pattern == peft_rank_pattern(theirs)
    # the final budget is target_r per layer on average: 2 x 10 triplets, spread unevenly
    assert sum(map(sum, pattern.values())) == 2 * 10
    assert len({sum(v) for v in pattern.values()}) > 1
    # 16 AdamW steps at lr 2e-2 from the same start: measured 1.8e-7 (dense base), 1.6e-7 (4-bit); bound 1e-5
    assert triplet_diff(ours, theirs) < 1e-5
    for name, layer in A.adalora_layers(ours).items():
        assert torch.all(layer.E[~torch.tensor(pattern[name])] == 0)  # the pattern is applied after each step
    assert rank_allocator_state(ours) == (16, 15, True)


def rank_allocator_state(model):
    allocator = A.rank_allocator(model)
    return allocator.calls, allocator.last_step, allocator.final


def test_the_budget_schedule_is_peft_cubic_one():
    ours, theirs = ours_and_peft(use_qlora=False)
    mine, other = A.rank_allocator(ours), theirs.base_model.rankallocator
    assert [mine.budget_schedule(s) for s in range(17)] == [other.budget_schedule(s) for s in range(17)]
    # 40 triplets until tinit = 2, then 40 -> 20 cubically until step 12, 20 after
    assert [mine.budget_schedule(s)[0] for s in (0, 2, 3, 7, 11, 12, 13)] == [40, 40, 34, 22, 20, 20, 20]


def test_target_r_equal_to_init_r_prunes_nothing():
    # PEFT's mask_to_budget calls torch.kthvalue(k=0) at the final step here and fails; nothing is to be pruned
    model = A.adalora_model(tiny_llama(seed=0), ["gate_proj"], alpha=8, init_r=2, target_r=2, total_step=3, tfinal=1)
    model.train()
    for step in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        A.update_and_allocate(model, step)
        model.zero_grad()
    assert A.rank_pattern(model) == {f"model.layers.{i}.mlp.gate_proj": [True, True] for i in range(2)}


# ---------------------------------------------------------------- the Trainer
def test_the_trainer_callback_allocates_during_train(tmp_path):
    from datasets import Dataset

    from qlora_tutorial.device import Runtime
    from qlora_tutorial.train import make_trainer, training_arguments

    torch.manual_seed(1)
    model = A.adalora_model(tiny_llama(seed=0), TARGETS, alpha=8, init_r=4, target_r=2, total_step=8, tinit=1,
                            tfinal=2, deltaT=1, use_qlora=False)
    data = Dataset.from_list([{"input_ids": row.tolist(), "labels": row.tolist()} for row in IDS])
    args = training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32), learning_rate=2e-2,
                              max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                              logging_steps=100)
    trainer = make_trainer(model, args, data, pad_token_id=0)
    trainer.add_callback(A.AdaLoraCallback())
    assert A.rank_pattern(model) is None
    trainer.train()
    # called once per optimizer step with the 0-based step; the pattern fixed at step 8 - 2 = 6
    assert rank_allocator_state(model) == (8, 7, True)
    pattern = A.rank_pattern(model)
    assert sum(map(sum, pattern.values())) == 2 * 10 and not all(all(v) for v in pattern.values())
    for name, layer in A.adalora_layers(model).items():
        keep = torch.tensor(pattern[name])
        assert torch.all(layer.E[~keep] == 0) and torch.all(layer.E[keep] != 0)


def test_the_callback_refuses_a_run_longer_than_total_step(tmp_path):
    from datasets import Dataset

    from qlora_tutorial.device import Runtime
    from qlora_tutorial.train import make_trainer, training_arguments

    model = A.adalora_model(tiny_llama(seed=0), ["gate_proj"], alpha=8, init_r=4, target_r=2, total_step=4,
                            use_qlora=False)
    data = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4)
    args = training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32), max_steps=6,
                              gradient_accumulation_steps=1)
    trainer = make_trainer(model, args, data, pad_token_id=0)
    trainer.add_callback(A.AdaLoraCallback())
    with pytest.raises(ValueError, match="max_steps=6.*total_step=4"):
        trainer.train()


# ---------------------------------------------------------------- merge, save, load, PEFT files
@pytest.mark.parametrize("use_qlora", [False, True])
def test_merge_equals_the_unmerged_forward(use_qlora):
    model = trained_ours(use_qlora)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    merged = A.merge_adalora(model)
    assert not A.adalora_layers(merged) and "adalora" not in merged.__dict__ and not merged._forward_hooks
    assert type(merged.get_submodule("model.layers.0.mlp.gate_proj")) is torch.nn.Linear
    with torch.no_grad():
        # W0 + P diag(E) Q * s formed once instead of applied per token (in 4-bit mode, the dequantized
        # weight in one dense matmul): float32 rounding, measured 3.0e-7; bound 1e-5
        assert (merged(input_ids=IDS).logits - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("use_qlora", [False, True])
def test_save_and_load_round_trip_bit_exact(tmp_path, use_qlora):
    model = trained_ours(use_qlora)
    A.save_adalora(model, tmp_path)
    back = A.load_adalora(tiny_llama(seed=0), tmp_path)
    assert A.rank_pattern(back) == A.rank_pattern(model) and A.rank_allocator(back).final
    assert A.rank_allocator(back).settings == A.rank_allocator(model).settings
    for name, layer in A.adalora_layers(model).items():
        other = back.get_submodule(name)
        assert other.use_qlora == use_qlora
        assert all(torch.equal(getattr(layer, k), getattr(other, k)) for k in ("W_a", "E", "W_b"))
        assert torch.equal(layer.quant_nn.weight.data, other.quant_nn.weight.data)
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, model(input_ids=IDS).logits)
    # loading again into the loaded model (same layers, settings and base) is allowed and changes nothing
    before = snapshot(back)
    A.load_adalora(back, tmp_path)
    assert_unchanged(back, before)


def test_export_to_peft_loads_in_peft_and_imports_back(tmp_path):
    model = trained_ours(use_qlora=False)
    pattern = A.rank_pattern(model)
    A.export_adalora_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()
    assert theirs.peft_config["default"].peft_type == peft.PeftType.ADALORA
    for name in A.adalora_layers(model):
        layer = peft_layer(theirs, name)
        assert layer.r["default"] == sum(pattern[name])  # PEFT keeps only the kept triplets
        if sum(pattern[name]):  # and still divides by init_r (a layer with nothing left gets ranknum 0)
            assert layer.ranknum["default"].item() == 4
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        # PEFT multiplies (x, r') by (r', out) with the pruned triplets gone, ours with them at E = 0:
        # measured 2.1e-7; bound 1e-5
        assert (theirs(input_ids=IDS).logits - expected).abs().max().item() < 1e-5
        back = A.import_adalora_peft(tiny_llama(seed=0), tmp_path)
        assert A.rank_pattern(back) == pattern
        # W_a * E is the same matrix (pruned columns are zeros either way): bit-exact
        assert torch.equal(back(input_ids=IDS).logits, expected)


def test_export_writes_what_peft_saves_and_imports_what_peft_saved(tmp_path):
    ours, theirs = ours_and_peft(use_qlora=False)
    train_side_by_side(ours, theirs)
    A.export_adalora_peft(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "peft"))
    mine, other = (read_folder(tmp_path / d, "adapter_config.json", "adapter_model.safetensors")
                   for d in ("ours", "peft"))
    for key in ("peft_type", "init_r", "target_r", "lora_alpha", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                "orth_reg_weight", "total_step", "rank_pattern"):
        assert mine[0][key] == other[0][key], key
    assert sorted(mine[0]["target_modules"]) == sorted(other[0]["target_modules"])
    assert {k: v.shape for k, v in mine[1].items()} == {k: v.shape for k, v in other[1].items()}
    assert all((mine[1][k] - other[1][k]).abs().max().item() < 1e-5 for k in mine[1] if mine[1][k].numel())
    # PEFT's own folder imports into our layers and computes what PEFT's model computes
    back = A.import_adalora_peft(tiny_llama(seed=0), tmp_path / "peft")
    assert A.rank_pattern(back) == A.rank_pattern(ours)
    with torch.no_grad():
        theirs.eval()
        assert (back(input_ids=IDS).logits - theirs(input_ids=IDS).logits).abs().max().item() < 1e-5


# ---------------------------------------------------------------- errors, and nothing changed
@pytest.mark.parametrize("kwargs, match", [
    (dict(init_r=4, target_r=6), "target_r=6 must be an integer from 1 to init_r=4"),
    (dict(tinit=10, tfinal=6), "tinit=10 \\+ tfinal=6 >= total_step=16"),
    (dict(deltaT=0), "deltaT must be an integer >= 1"),
    (dict(beta1=0.0), "beta1 must lie strictly between 0 and 1"),
    (dict(beta2=1.0), "beta2 must lie strictly between 0 and 1"),
    (dict(total_step=0), "total_step must be an integer >= 1"),
    (dict(orth_reg_weight=-0.1), "orth_reg_weight must be a finite number >= 0"),
])
def test_bad_settings_are_refused_and_change_nothing(kwargs, match):
    model = tiny_llama(seed=0)
    fails_and_changes_nothing(model, lambda: A.adalora_model(model, TARGETS, alpha=8, **{**SCHEDULE, **kwargs}), match)
    assert "adalora" not in model.__dict__ and not model._forward_hooks


def test_an_unknown_target_or_a_wrapped_model_is_refused():
    model = tiny_llama(seed=0)
    fails_and_changes_nothing(model, lambda: A.adalora_model(model, ["gate"], alpha=8, **SCHEDULE), "gate_proj")
    A.adalora_model(model, ["gate_proj"], alpha=8, **SCHEDULE)
    fails_and_changes_nothing(model, lambda: A.adalora_model(model, ["up_proj"], alpha=8, **SCHEDULE), "once")


def test_update_and_allocate_refuses_bad_steps_and_missing_gradients():
    model = A.adalora_model(tiny_llama(seed=0), TARGETS, alpha=8, **SCHEDULE).train()
    fails_and_changes_nothing(model, lambda: A.update_and_allocate(model, 17), "step 17, outside 0..total_step=16")
    # without backward there is nothing to score by
    fails_and_changes_nothing(model, lambda: A.update_and_allocate(model, 0),
                              "no gradient on model.layers.0.self_attn.q_proj.W_a.*after loss.backward")
    model(input_ids=IDS, labels=IDS).loss.backward()
    # skipping to the fixed phase without ever reaching step total_step - tfinal = 12
    fails_and_changes_nothing(model, lambda: A.update_and_allocate(model, 13), "never fixed")
    assert rank_allocator_state(model) == (0, None, False) and A.rank_allocator(model).ipt == {}
    with pytest.raises(ValueError, match="not an AdaLoRA model"):
        A.update_and_allocate(tiny_llama(seed=0), 0)


def test_a_forgotten_update_and_allocate_is_caught(tmp_path):
    model = A.adalora_model(tiny_llama(seed=0), ["gate_proj"], alpha=8, init_r=4, target_r=2, total_step=3).train()
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
    # saving, exporting or merging an adapter that was trained but never pruned is refused ...
    for call in (lambda: A.save_adalora(model, tmp_path / "a"), lambda: A.export_adalora_peft(model, tmp_path / "b"),
                 lambda: A.merge_adalora(model)):
        fails_and_changes_nothing(model, call, "update_and_allocate was never called")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # ... and a training forward pass beyond total_step stops the run
    with pytest.raises(ValueError, match="4 training forward passes.*AdaLoraCallback"):
        model(input_ids=IDS, labels=IDS)
    # evaluation passes do not count
    with torch.no_grad():
        model.eval()(input_ids=IDS, labels=IDS)


def test_loading_refuses_what_does_not_fit_and_changes_nothing(tmp_path):
    model = trained_ours(use_qlora=False)
    A.save_adalora(model, tmp_path / "ours")
    A.export_adalora_peft(model, tmp_path / "peft")
    adapters.export_peft(quantize_model(tiny_llama(seed=0), ["gate_proj"], alpha=8, r=2, use_qlora=False),
                         tmp_path / "lora")
    wider = tiny_llama(intermediate_size=192, seed=0)
    fails_and_changes_nothing(wider, lambda: A.load_adalora(wider, tmp_path / "ours"),
                              r"model.layers.0.mlp.gate_proj: W_b has shape \(4, 128\) but the layer needs \(4, 192\)")
    fails_and_changes_nothing(wider, lambda: A.import_adalora_peft(wider, tmp_path / "peft"), "do not fit")
    plain = tiny_llama(seed=0)
    fails_and_changes_nothing(plain, lambda: A.import_adalora_peft(plain, tmp_path / "lora"), "not 'ADALORA'")
    # an AdaLoRA model with other settings
    other = A.adalora_model(tiny_llama(seed=0), TARGETS, alpha=8, **{**SCHEDULE, "total_step": 20})
    fails_and_changes_nothing(other, lambda: A.load_adalora(other, tmp_path / "ours"), "other layers or settings")
    # our plain-LoRA loaders name the AdaLoRA folder for what it is
    with pytest.raises(ValueError, match="qlora_tutorial.adalora"):
        adapters.load_adapter(tiny_llama(seed=0), tmp_path / "ours")



def test_the_date_task_study_is_recorded_as_its_module_defines_it():
    """book/data/adalora_date_task.json (chapter 14): every setup of bench.adalora_study with every seed,
    the command and machine that made it, and each AdaLoRA run pruned to exactly LoRA's budget."""
    import json
    from pathlib import Path

    from qlora_tutorial.bench import adalora_study as study

    assert study.ADALORA["alpha"] / study.ADALORA["init_r"] == study.LORA["alpha"] / study.LORA["r"]
    assert study.ADALORA["target_r"] == study.LORA["r"]
    record = json.loads((Path(__file__).resolve().parent.parent / "book" / "data" / "adalora_date_task.json").read_text())
    prov = record["provenance"]
    assert {"device", "torch", "bitsandbytes", "transformers", "peft", "date", "command"} <= set(prov)
    assert prov["command"] == "python -m qlora_tutorial.bench.adalora_study"
    runs = {(r["setup"], r["seed"]): r for r in record["runs"]}
    assert set(runs) == {(name, seed) for name in study.SETUPS for seed in study.SEEDS}
    for (name, _), r in runs.items():
        assert 0 <= r["exact_match"] <= 1 and r["lr"] == study.SETUPS[name]["lr"]
        if study.SETUPS[name]["kind"] == "adalora":
            pattern = r["rank_pattern"]
            assert all(len(kept) == study.ADALORA["init_r"] for kept in pattern.values())
            assert sum(map(sum, pattern.values())) == study.ADALORA["target_r"] * len(pattern)
