"""Tokenisation, collation, the Trainer helpers and the task score, with the real tokenizer and Trainer."""
import datasets
import pytest
import torch

from qlora_tutorial import quantize_model
from qlora_tutorial import train as T
from qlora_tutorial.device import Runtime
from qlora_tutorial.models import load_tokenizer, tiny_llama
from qlora_tutorial.tasks import date_datasets


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def small_model(tok):
    """A tiny random Llama that speaks SmolLM2's vocabulary, with LoRA on its MLP."""
    model = tiny_llama(vocab_size=len(tok), seed=0)
    return quantize_model(model, ["gate_proj", "up_proj", "down_proj"], alpha=16, r=4, use_qlora=True)


def test_prompt_answer_labels_only_the_answer(tok):
    ds = datasets.Dataset.from_list([{"prompt": "Date: 2021-07-04\nIn words:", "answer": "4 July 2021"}])
    row = T.tokenize_prompt_answer(ds, tok)[0]
    assert set(row) == {"input_ids", "attention_mask", "labels"}
    n_prompt = len(tok("Date: 2021-07-04\nIn words:", add_special_tokens=False)["input_ids"])
    assert row["labels"][:n_prompt] == [T.IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert tok.decode(row["labels"][n_prompt:]) == " 4 July 2021" + tok.eos_token
    assert row["input_ids"][-1] == tok.eos_token_id


def test_prompt_answer_missing_column(tok):
    ds = datasets.Dataset.from_list([{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="no column 'prompt'"):
        T.tokenize_prompt_answer(ds, tok)


def test_tokenize_texts(tok):
    ds = datasets.Dataset.from_list([{"quote": "Be yourself; everyone else is already taken.", "author": "x"}])
    row = T.tokenize_texts(ds, tok, max_length=64)[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["input_ids"]) == "Be yourself; everyone else is already taken." + tok.eos_token
    assert len(T.tokenize_texts(ds, tok, max_length=4)[0]["input_ids"]) == 4
    with pytest.raises(ValueError, match="no column 'text'"):
        T.tokenize_texts(ds, tok, column="text")
    with pytest.raises(ValueError, match="at least 2"):
        T.tokenize_texts(ds, tok, max_length=1)


def test_collator_masks_padding_but_keeps_eos(tok):
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # the trap the collator avoids
    rows = [{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [7, eos], "labels": [7, eos]}]
    batch = T.PadCollator(tok.pad_token_id)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, eos], [7, eos, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_precision_flags():
    assert T.precision_flags(torch.bfloat16, "cuda") == {"bf16": True, "fp16": False}
    assert T.precision_flags(torch.float16, "cuda") == {"bf16": False, "fp16": True}
    assert T.precision_flags(torch.float32, "cpu") == {"bf16": False, "fp16": False}


def test_optimizer_flags_page_on_gpu_only(tmp_path):
    from transformers import TrainingArguments

    assert T.optimizer_flags("cuda") == {"optim": "paged_adamw_32bit"}
    assert T.optimizer_flags("cpu") == {}
    args = T.training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32))
    default = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none").optim
    assert args.optim == default and "paged" not in str(args.optim)  # the CPU run keeps the Trainer's AdamW


def test_training_arguments_original_recipe(tmp_path):
    args = T.training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate,
            args.max_steps, args.logging_steps) == (4, 4, 2e-4, 60, 5)
    assert not args.bf16 and not args.fp16 and args.dataloader_num_workers == 0 and args.seed == 0
    args = T.training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32), max_steps=7, seed=3)
    assert args.max_steps == 7 and args.seed == 3 and args.data_seed == 3


def test_make_trainer_refuses_raw_text_and_frozen_models(tok, tmp_path):
    args = T.training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32))
    raw = datasets.Dataset.from_list([{"quote": "a", "author": "b"}])
    with pytest.raises(ValueError, match="tokenise it first"):
        T.make_trainer(small_model(tok), args, raw, tok.pad_token_id)
    data = T.tokenize_texts(raw, tok)
    frozen = tiny_llama(vocab_size=len(tok)).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        T.make_trainer(frozen, args, data, tok.pad_token_id)


def run_tiny(tok, tmp_path, steps=6, **overrides):
    train, _ = date_datasets(48, 0, seed=0)
    data = T.tokenize_prompt_answer(train, tok)
    torch.manual_seed(0)
    model = small_model(tok)
    args = T.training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32),
                                per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                max_steps=steps, learning_rate=1e-2, logging_steps=2, **overrides)
    return model, T.train(T.make_trainer(model, args, data, tok.pad_token_id))


@pytest.mark.slow
def test_training_is_quiet_deterministic_and_learns(tok, tmp_path, capsys):
    model, first = run_tiny(tok, tmp_path)
    out = capsys.readouterr()
    assert out.out == ""  # nothing on stdout: notebooks stay deterministic
    assert "training" in out.err  # the progress bar is on stderr
    _, second = run_tiny(tok, tmp_path)
    assert [s for s, _ in first["losses"]] == [2, 4, 6]
    assert first["losses"] == second["losses"]  # same seed, same losses, bit for bit
    assert first["losses"][-1][1] < first["losses"][0][1]
    assert first["seconds"] > 0 and first["peak_gpu_bytes"] is None
    assert not model.training
    # only LoRA matrices changed
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.W_b.abs().sum() > 0


def test_generate_and_evaluate(tok):
    model = small_model(tok).eval()
    _, test = date_datasets(4, 3, seed=0)
    side = tok.padding_side
    outs = T.generate(model, tok, ["Date: 2000-01-01\nIn words:", "Hi"], max_new_tokens=3)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert tok.padding_side == side
    acc, preds = T.evaluate_task(model, tok, test, max_new_tokens=3)
    assert acc == 0.0 and len(preds) == 3  # a random model does not know the task
    assert (acc, preds) == T.evaluate_task(model, tok, test, max_new_tokens=3)  # greedy: repeatable
    assert not model.training


def test_logged_losses_skips_summary():
    class State:
        log_history = [{"loss": 2.0, "step": 5}, {"loss": 1.0, "step": 10}, {"train_loss": 1.5, "step": 10}]

    class Trainer:
        state = State()

    assert T.logged_losses(Trainer()) == [(5, 2.0), (10, 1.0)]


def test_trainer_console_callbacks_replaced(tok, tmp_path):
    from transformers import PrinterCallback, ProgressCallback

    args = T.training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32))
    data = T.tokenize_texts(datasets.Dataset.from_list([{"quote": "a b c"}]), tok)
    names = [type(c).__name__ for c in T.make_trainer(small_model(tok), args, data, tok.pad_token_id).callback_handler.callbacks]
    assert "StderrProgress" in names
    assert not {ProgressCallback.__name__, PrinterCallback.__name__, "NotebookProgressCallback"} & set(names)


def test_checkpointing_arguments_are_non_reentrant(tmp_path):
    args = T.training_arguments(str(tmp_path), Runtime(torch.device("cpu"), torch.float32), gradient_checkpointing=True)
    on = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert on and kwargs == {"use_reentrant": False}


@pytest.mark.slow
def test_checkpointing_changes_memory_not_the_math(tok, tmp_path):
    _, plain = run_tiny(tok, tmp_path, steps=4)
    model, ckpt = run_tiny(tok, tmp_path, steps=4, gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    assert [l for _, l in ckpt["losses"]] == pytest.approx([l for _, l in plain["losses"]], abs=1e-5)
    assert model.get_submodule("model.layers.0.mlp.gate_proj").W_b.abs().sum() > 0  # the adapters did train


def test_set_checkpointing(tok):
    model = small_model(tok)
    T.set_checkpointing(model, True)
    assert model.is_gradient_checkpointing
    T.set_checkpointing(model, False)
    assert not model.is_gradient_checkpointing


def test_chat_prompts_put_the_task_in_the_models_chat_format(tok):
    from qlora_tutorial.tasks import CHAT_SYSTEM, chat_prompts

    ds = datasets.Dataset.from_list([{"prompt": "Date: 2021-07-04\nIn words:", "answer": "4 July 2021"}])
    chat = chat_prompts(ds, tok)
    prompt = chat[0]["prompt"]
    assert CHAT_SYSTEM in prompt and "Date: 2021-07-04\nIn words:" in prompt
    assert prompt.endswith("<|im_start|>assistant\n") and chat[0]["answer"] == "4 July 2021"
    row = T.tokenize_prompt_answer(chat, tok, separator="")[0]
    learned = [t for t in row["labels"] if t != T.IGNORE_INDEX]
    assert tok.decode(learned) == "4 July 2021" + tok.eos_token == "4 July 2021<|im_end|>"
    assert tok.decode(row["input_ids"]) == prompt + "4 July 2021<|im_end|>"


def test_chat_prompts_need_a_chat_template(tok):
    from qlora_tutorial.tasks import chat_prompts

    class Plain:
        chat_template = None

    ds = datasets.Dataset.from_list([{"prompt": "Date: 2021-07-04\nIn words:", "answer": "4 July 2021"}])
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompts(ds, Plain())
