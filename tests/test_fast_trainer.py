"""FastTrainer: the training step compiled and recorded as CUDA graphs inside a Hugging Face Trainer.

On a CPU: the fallback to the ordinary step (with its reason), and the fast step's pieces run
unrecorded (``record=False``): gradients accumulated into fixed buffers, clipping and AdamW in one
update, the scheduler's rate written into tensors. These must train like the ordinary Trainer.
On a CUDA GPU: 50 recorded steps against the ordinary Trainer on the same data and seed.
"""
import math
import warnings

import datasets
import pytest
import torch

from qlora_tutorial import fast, quantize_model
from qlora_tutorial import train as T
from qlora_tutorial.device import Runtime
from qlora_tutorial.models import tiny_llama

CUDA = torch.cuda.is_available()
VOCAB = 256


def rows(n=24, seed=0):
    """Rows of different lengths (5 to 12 tokens), the first 3 tokens of each unlearned (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 13, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [T.IGNORE_INDEX] * 3 + ids[3:]})
    return datasets.Dataset.from_list(out)


def model_on(device, dtype=torch.float32):
    model = tiny_llama(vocab_size=VOCAB, seed=0).to(device=device, dtype=dtype)
    return quantize_model(model, "all", alpha=16, r=4, compute_dtype=dtype)


def arguments(tmp, device, **overrides):
    runtime = Runtime(torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32)
    settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3,
                    max_steps=6, logging_steps=1, lr_scheduler_type="linear", warmup_steps=2,
                    max_grad_norm=0.05, weight_decay=0.01, optim="adamw_torch")
    settings.update(overrides)
    return T.training_arguments(str(tmp), runtime, **settings)


class Rates:
    """The learning rate each optimizer step used, read from the optimizer itself."""

    def __init__(self):
        from transformers import TrainerCallback

        seen = self.seen = []

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
                seen.append(float(fast._raw_optimizer(optimizer).param_groups[0]["lr"]))

        self.callback = Callback()


def run(trainer_kind, tmp, device="cpu", data=None, eval_data=None, **overrides):
    torch.manual_seed(0)
    model = model_on(device)
    args = arguments(tmp, device, **overrides)
    data = rows() if data is None else data
    if trainer_kind == "ordinary":
        trainer = T.make_trainer(model, args, data, pad_token_id=0, pad_to=12, eval_dataset=eval_data)
    else:
        trainer = fast.make_fast_trainer(model, args, data, pad_token_id=0, eval_dataset=eval_data, **trainer_kind)
    rates = Rates()
    trainer.add_callback(rates.callback)
    trainer.train()
    return trainer, [e for e in trainer.state.log_history if "loss" in e], rates.seen


@pytest.mark.slow
def test_unrecorded_fast_step_trains_like_the_trainer(tmp_path):
    """Accumulation over 2 micro-batches, clipping at 0.05 (every step clips), a warm-up then linear
    schedule, weight decay: the losses, gradient norms and rates of the fast step's pieces equal the
    ordinary Trainer's, to float32 rounding."""
    _, ordinary, ordinary_rates = run("ordinary", tmp_path / "a")
    trainer, fast_logs, fast_rates = run({"record": False, "compile": False}, tmp_path / "b")
    assert trainer.why_ordinary is None and trainer.step_engine is not None and not trainer.step_engine.record
    assert len(ordinary) == len(fast_logs) == 6
    for a, b in zip(ordinary, fast_logs):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a, b)
        assert a["learning_rate"] == b["learning_rate"]
        assert a["grad_norm"] > 0.05  # the clipping was active at every step
    # the rates the optimizer itself held: warm-up 0, 2.5e-3, then linear decay
    assert fast_rates == pytest.approx(ordinary_rates, rel=1e-6)
    assert fast_rates[:3] == pytest.approx([0.0, 2.5e-3, 5e-3])
    assert ordinary[-1]["loss"] < ordinary[0]["loss"]


@pytest.mark.slow
def test_without_cuda_the_fast_trainer_is_the_ordinary_one_and_says_why(tmp_path):
    _, ordinary, _ = run("ordinary", tmp_path / "a", max_steps=3)
    with pytest.warns(UserWarning, match="ordinary Trainer step: the model is on cpu, and CUDA graphs need a CUDA GPU"):
        trainer, logs, _ = run({}, tmp_path / "b", max_steps=3)
    assert trainer.step_engine is None and "CUDA" in trainer.why_ordinary
    assert [e["loss"] for e in logs] == [e["loss"] for e in ordinary]  # the very same step


@pytest.mark.slow
@pytest.mark.parametrize("change, reason", [
    ({"optim": "adafactor"}, "optim='adafactor'"),
    ({"gradient_checkpointing": True}, "gradient checkpointing"),
])
def test_what_a_recording_cannot_take_falls_back_with_its_reason(tmp_path, change, reason):
    with pytest.warns(UserWarning, match=reason):
        trainer, logs, _ = run({"record": False, "compile": False}, tmp_path, max_steps=1, **change)
    assert trainer.step_engine is None and reason in trainer.why_ordinary and len(logs) == 1


@pytest.mark.slow
def test_an_optimizer_from_outside_falls_back(tmp_path):
    model = model_on("cpu")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = fast.make_fast_trainer(model, arguments(tmp_path, "cpu", max_steps=1), rows(), pad_token_id=0,
                                     optimizers=(optimizer, None))
    with pytest.warns(UserWarning, match="an optimizer was given"):
        trainer.train()
    assert fast._raw_optimizer(trainer.optimizer) is optimizer and trainer.step_engine is None


def test_the_callers_arguments_stay_as_they_were(tmp_path):
    args = arguments(tmp_path, "cpu")
    assert args.logging_nan_inf_filter and not args.accelerator_config.non_blocking
    trainer = fast.make_fast_trainer(model_on("cpu"), args, rows(), pad_token_id=0)
    assert not trainer.args.logging_nan_inf_filter
    assert not trainer.args.accelerator_config.non_blocking  # these arguments train on the CPU: nothing to copy
    assert args.logging_nan_inf_filter and not args.accelerator_config.non_blocking


def test_fixed_width_padding_and_its_refusal():
    collate = T.PadCollator(0, pad_to=8)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7] + [T.IGNORE_INDEX] * 5]
    with pytest.raises(ValueError, match="a row has 9 tokens, more than pad_to=8"):
        collate([{"input_ids": list(range(9))}])


@pytest.mark.slow
def test_make_fast_trainer_pads_to_the_longest_row_and_evaluates(tmp_path):
    data = rows()
    longest = max(len(r) for r in data["input_ids"])
    trainer = fast.make_fast_trainer(model_on("cpu"), arguments(tmp_path, "cpu", max_steps=2), data,
                                     pad_token_id=0, eval_dataset=rows(8, seed=1), record=False, compile=False)
    assert trainer.data_collator.pad_to == longest
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_the_scheduler_writes_into_the_rate_tensors():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": torch.tensor(1.0)}], foreach=False)
    shadow = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 1.0}])
    scheduler = fast.LearningRateIntoTensors(torch.optim.lr_scheduler.LambdaLR(shadow, lambda k: 0.5 ** k), optimizer)
    rate = optimizer.param_groups[0]["lr"]
    for k in range(4):
        assert float(rate) == 0.5 ** k and scheduler.get_last_lr() == [0.5 ** k]
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is rate  # the same tensor: a recording reads its memory
    state = scheduler.state_dict()
    scheduler.step()
    scheduler.load_state_dict(state)
    assert float(rate) == 0.5 ** 4


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_recorded_trainer_matches_the_ordinary_one_over_50_steps(tmp_path):
    """50 recorded steps (bf16, accumulation 2, clipping, warm-up and linear decay) against the
    ordinary Trainer on the same data and seed: the same rates, losses within 2% of each other."""
    data = rows(16)  # 25 passes over 16 rows: the run learns them, so the losses have somewhere to go
    settings = dict(max_steps=50, logging_steps=1, learning_rate=2e-3, max_grad_norm=1.0)
    _, ordinary, ordinary_rates = run("ordinary", tmp_path / "a", "cuda", data, **settings)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="FastTrainer")  # no fallback, no unrecorded batch
        trainer, recorded, rates = run({}, tmp_path / "b", "cuda", data, **settings)
    assert trainer.why_ordinary is None and trainer.step_engine.record
    assert rates == pytest.approx(ordinary_rates, rel=1e-6)
    assert len(recorded) == len(ordinary) == 50
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ordinary, recorded))
    assert worst < 0.02, worst
    # learning: the same settings unrecorded in float32 on a CPU go from 5.61 to 4.97
    assert recorded[-1]["loss"] < recorded[0]["loss"] - 0.3, (recorded[0]["loss"], recorded[-1]["loss"])
    assert all(e["grad_norm"] > 0 for e in recorded)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_recorded_trainer_evaluates_and_saves_checkpoints(tmp_path):
    data = rows(64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="FastTrainer")
        trainer, logs, _ = run({}, tmp_path, "cuda", data, rows(8, seed=1), max_steps=8, eval_strategy="steps",
                               eval_steps=4, save_strategy="steps", save_steps=4)
    # evaluation ran between replays, as in the ordinary Trainer
    evaluations = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evaluations) == 2 and all(math.isfinite(x) for x in evaluations)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert (tmp_path / "checkpoint-8" / "optimizer.pt").is_file() and (tmp_path / "checkpoint-8" / "scheduler.pt").is_file()
    assert (tmp_path / "checkpoint-8" / "adapter.safetensors").is_file()  # the adapter, as save_pretrained cannot


@pytest.mark.slow
def test_a_checkpoint_holds_the_adapter_of_the_step_it_was_taken_at(tmp_path):
    """save_pretrained refuses a model with Qlora_4_bit layers; the fast Trainer's checkpoints hold
    its adapter instead, which loads back into a fresh model as trained, beside the optimizer's state."""
    from qlora_tutorial.adapters import adapter_tensors, load_adapter

    trainer, _, _ = run({"record": False, "compile": False}, tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    last = tmp_path / "checkpoint-4"
    assert {"adapter.safetensors", "adapter.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= \
        {p.name for p in last.iterdir()}
    trained = adapter_tensors(trainer.model)
    reloaded = adapter_tensors(load_adapter(tiny_llama(vocab_size=VOCAB, seed=0), last))
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[k].cpu(), reloaded[k]) for k in trained)
    first = adapter_tensors(load_adapter(tiny_llama(vocab_size=VOCAB, seed=0), tmp_path / "checkpoint-2"))
    assert any(not torch.equal(first[k], reloaded[k]) for k in trained)  # two more steps moved it


@pytest.mark.slow
def test_a_plateau_schedule_falls_back(tmp_path):
    """reduce_lr_on_plateau steps on evaluation metrics, which the rate tensors are not written from."""
    with pytest.warns(UserWarning, match="reduce_lr_on_plateau"):
        trainer, logs, _ = run({"record": False, "compile": False}, tmp_path, "cpu", None, rows(8, seed=1), max_steps=2,
                               lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=1)
    assert trainer.step_engine is None and len(logs) == 2


def test_checkpointing_is_seen_through_a_peft_model():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(vocab_size=VOCAB)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    args = arguments("unused", "cpu")
    assert not T.checkpointing_on(peft_model, args)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert T.checkpointing_on(peft_model, args)  # what prepare_model_for_kbit_training turns on


@pytest.mark.slow
def test_a_parameter_without_gradient_is_left_alone(tmp_path):
    """The ordinary Trainer's AdamW skips a parameter whose gradient is None (no weight decay either);
    the fast step's pieces do the same."""
    torch.manual_seed(0)
    model = model_on("cpu")
    model.unused = torch.nn.Parameter(torch.ones(3))  # trainable, and the loss never reaches it
    trainer = fast.make_fast_trainer(model, arguments(tmp_path, "cpu", max_steps=2, weight_decay=0.5), rows(),
                                     pad_token_id=0, record=False, compile=False)
    trainer.train()
    assert trainer.step_engine.has_grad.count(False) == 1
    assert torch.equal(model.unused.detach(), torch.ones(3))
