"""Fine-tuning with the Hugging Face ``Trainer``: data preparation, the run, and the task's score.

The original README hands the raw quotes dataset straight to the ``Trainer``. That cannot work: a causal LM
trains on token ids and labels, not on strings. The pieces here do the missing steps:

* ``tokenize_texts`` (quotes: learn every token) and ``tokenize_prompt_answer`` (the date task:
  learn only the answer) turn rows into ``input_ids`` and ``labels``;
* ``PadCollator`` pads a batch and masks the padding with -100 in the labels. It masks by the
  attention mask, not by token id: SmolLM2's pad token *is* its end-of-text token, and
  ``DataCollatorForLanguageModeling`` (which masks every pad-id token) would hide the end-of-text
  token the model must learn to emit;
* ``training_arguments`` holds the original README's recipe (batch 4, accumulation 4, lr 2e-4, 60 steps, a log
  every 5) and the dtype flags for a GPU; ``make_trainer`` builds a ``Trainer`` whose progress bar goes
  to stderr and that prints nothing else, so a notebook's printed output stays deterministic;
* ``generate`` and ``evaluate_task`` give greedy answers and exact-match accuracy on held-out data.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from .tasks import clean_answer, exact_match

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (PyTorch's cross_entropy default)


# ---------------------------------------------------------------- tokenisation
def _eos(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so answers can end")
    return tokenizer.eos_token


def tokenize_texts(dataset, tokenizer, column: str = "quote", max_length: int = 64, add_eos: bool = True):
    """Tokenise one text column for plain language modelling: labels = input_ids (every token learned).

    Texts longer than ``max_length`` tokens are cut. Returns a dataset with input_ids, attention_mask,
    labels only (the text columns are removed, so the ``Trainer`` has nothing to drop silently).
    """
    if column not in dataset.column_names:
        raise ValueError(f"dataset has no column {column!r}; its columns are {dataset.column_names}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    suffix = _eos(tokenizer) if add_eos else ""

    def encode(row):
        ids = tokenizer(row[column] + suffix, add_special_tokens=False)["input_ids"][:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    return dataset.map(encode, remove_columns=dataset.column_names)


def tokenize_prompt_answer(dataset, tokenizer, prompt: str = "prompt", answer: str = "answer", separator: str = " "):
    """Tokenise prompt + separator + answer + end-of-text; only the answer and end-of-text are learned.

    The prompt's labels are -100, so the loss (and the gradient) comes from the tokens the model must
    produce. The end-of-text token is learned too: it is what stops generation after the answer.
    ``separator=""`` for chat-formatted prompts (``tasks.chat_prompts``), which end where the
    assistant's answer starts.
    """
    for c in (prompt, answer):
        if c not in dataset.column_names:
            raise ValueError(f"dataset has no column {c!r}; its columns are {dataset.column_names}")
    eos = _eos(tokenizer)

    def encode(row):
        p = tokenizer(row[prompt], add_special_tokens=False)["input_ids"]
        a = tokenizer(separator + row[answer] + eos, add_special_tokens=False)["input_ids"]
        return {"input_ids": p + a, "attention_mask": [1] * (len(p) + len(a)),
                "labels": [IGNORE_INDEX] * len(p) + a}

    return dataset.map(encode, remove_columns=dataset.column_names)


@dataclass
class PadCollator:
    """Right-pad a list of tokenised rows into a batch; padded positions get label -100.

    The mask comes from the attention mask, never from comparing ids with ``pad_token_id`` (for
    SmolLM2 that id is also the end-of-text token, which must stay a label). ``pad_to`` pads every
    batch to that many tokens (a CUDA graph replays one shape); a longer row is refused.
    """
    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, rows):
        longest = max(len(r["input_ids"]) for r in rows)
        width = longest if self.pad_to is None else self.pad_to
        if longest > width:
            raise ValueError(f"a row has {longest} tokens, more than pad_to={self.pad_to}: cut the rows "
                             f"(tokenize with max_length={self.pad_to}) or pad to at least {longest}")
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            n = len(r["input_ids"])
            pad = width - n
            labels = r.get("labels", r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * n + [0] * pad)
            batch["labels"].append(list(labels) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---------------------------------------------------------------- the Trainer
ORIGINAL_RECIPE = dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, learning_rate=2e-4,
                   max_steps=60, logging_steps=5)
# The date task's recipe in chapter 08 and in the GPU quality study (``bench.quality``).
DATE_TASK_RECIPE = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-3,
                        max_steps=30, logging_steps=5)


def precision_flags(dtype: torch.dtype, device_type: str) -> dict:
    """The Trainer's mixed-precision switches for a compute dtype: bf16/fp16 autocast on a GPU, none on CPU."""
    if device_type != "cuda":
        return {"bf16": False, "fp16": False}
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def optimizer_flags(device_type: str) -> dict:
    """The Trainer's optimizer: bitsandbytes' paged AdamW on a GPU (the QLoRA paper's third idea), the default on CPU.

    Paging keeps the optimizer state in CUDA unified memory, which the driver moves to CPU RAM when
    the GPU runs short (a long batch's spike) instead of failing with out-of-memory. A CPU has no
    GPU memory to page out of, so there the Trainer's own AdamW stays.
    """
    return {"optim": "paged_adamw_32bit"} if device_type == "cuda" else {}


def training_arguments(output_dir: str, runtime=None, seed: int = 0, **overrides):
    """``TrainingArguments`` for the original README's recipe (``ORIGINAL_RECIPE``), changed by ``overrides``.

    Deterministic on a CPU: fixed seed, no dataloader workers, nothing reported to a tracker, no
    checkpoints written. ``runtime`` (from ``device.pick_device``) picks bf16/fp16 and bitsandbytes'
    paged AdamW (``optimizer_flags``) on a GPU; ``optim=...`` overrides it (e.g. "paged_adamw_8bit").
    ``gradient_checkpointing=True`` turns on non-reentrant checkpointing under whichever name the
    installed transformers uses.
    """
    from transformers import TrainingArguments

    from .device import pick_device

    runtime = runtime or pick_device()
    settings = dict(ORIGINAL_RECIPE)
    settings.update(output_dir=output_dir, seed=seed, data_seed=seed, dataloader_num_workers=0,
                    report_to="none", save_strategy="no", logging_strategy="steps",
                    use_cpu=runtime.device.type == "cpu", remove_unused_columns=False)
    settings.update(precision_flags(runtime.dtype, runtime.device.type))
    settings.update(optimizer_flags(runtime.device.type))
    checkpointing = overrides.pop("gradient_checkpointing", False)
    settings.update(overrides)
    if checkpointing:
        # Non-reentrant checkpointing, asked for explicitly: transformers 5 defaults to it, but the 4.56+
        # this package allows default to the reentrant kind, which gives no
        # gradient to the LoRA matrices when the block's input does not require grad, and with frozen
        # embeddings it does not: training would silently do nothing.
        # transformers 5 renamed the switch to activation_checkpointing; older versions know the old name.
        new = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        name = "activation_checkpointing" if new else "gradient_checkpointing"
        settings[name] = True
        settings[name + "_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(**settings)


def set_checkpointing(model, on: bool) -> None:
    """Turn (non-reentrant) gradient checkpointing of a transformers model on or off, outside a Trainer."""
    new = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5; older: gradient_checkpointing_*
    if on:
        enable = model.activation_checkpointing_enable if new else model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()


def checkpointing_on(model, args=None) -> bool:
    """Whether gradient (activation) checkpointing is on for ``model`` (a PeftModel answers for the
    model it wraps) or asked for by ``args``, under either of transformers' names."""
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers 5
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)  # transformers 4
    if args is None:
        return bool(flag)
    fields = type(args).__dataclass_fields__
    return bool(flag) or any(getattr(args, name) for name in ("activation_checkpointing", "gradient_checkpointing")
                             if name in fields)


def _progress_callback():
    from transformers import TrainerCallback

    class StderrProgress(TrainerCallback):
        """A progress bar on stderr showing the last logged loss; prints nothing to stdout."""

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.std import tqdm

            # Redrawn at most every 5 s: a notebook keeps every redraw as output.
            self.bar = tqdm(total=state.max_steps, file=sys.stderr, desc="training", leave=True, ascii=True,
                            mininterval=5.0)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and getattr(self, "bar", None) is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return StderrProgress()


def make_trainer(model, args, train_dataset, pad_token_id: int, optimizers=(None, None), eval_dataset=None,
                 pad_to: int | None = None, trainer_class=None):
    """A ``Trainer`` for ``model`` on a tokenised dataset, padded with ``PadCollator`` (to ``pad_to``
    tokens if given, else to each batch's longest row).

    ``optimizers`` goes to the ``Trainer`` as it is: ``(None, None)`` lets it build the optimizer
    ``args`` asks for; LoRA+ passes ``variants.loraplus_optimizer(model, args)``. ``eval_dataset``
    (tokenised the same way) is what ``trainer.evaluate()`` scores. On a GPU, compile the decoder
    blocks first (``fast.compile_for_training(model)``) to take most of the Python dispatch out of
    each step, or build the trainer with ``fast.make_fast_trainer``, which also records the step.
    ``trainer_class`` is a ``Trainer`` subclass to build instead (``fast.FastTrainer``).

    Its own progress display and log printer are replaced by one progress bar on stderr: the
    Trainer's ones print the log dicts (timings included) to stdout, or a table of them to a notebook.
    """
    from transformers import PrinterCallback, ProgressCallback, Trainer

    for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        missing = set() if data is None else {"input_ids", "labels"} - set(data.column_names)
        if missing:
            raise ValueError(f"{name} lacks {sorted(missing)}: tokenise it first "
                             "(tokenize_texts or tokenize_prompt_answer), the Trainer cannot train on raw text")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter of the model requires grad: wrap it with quantize_model(..., require_lora=True) first")
    trainer = (trainer_class or Trainer)(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                         data_collator=PadCollator(pad_token_id, pad_to), optimizers=optimizers)
    for callback in list(trainer.callback_handler.callbacks):
        # ProgressCallback (console), NotebookProgressCallback (Jupyter), PrinterCallback (disable_tqdm)
        if isinstance(callback, (ProgressCallback, PrinterCallback)) or type(callback).__name__ == "NotebookProgressCallback":
            trainer.remove_callback(callback)
    trainer.add_callback(_progress_callback())
    return trainer


def train(trainer) -> dict:
    """Run ``trainer.train()`` and return {"seconds", "losses" [(step, loss)], "peak_gpu_bytes"}."""
    model = trainer.model
    on_gpu = next(model.parameters()).device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    return {"seconds": seconds, "losses": logged_losses(trainer),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_gpu else None}


def logged_losses(trainer) -> list[tuple[int, float]]:
    """(step, training loss) pairs from ``trainer.state.log_history`` (the summary entry left out)."""
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


# ---------------------------------------------------------------- generation and the score
@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    prompts = list(prompts)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


@torch.no_grad()
def answer_loss(model, tokenizer, examples, batch_size: int = 32) -> float:
    """Mean cross-entropy (nats per token) of the answer tokens given their prompts, teacher-forced.

    The same tokens the training loss counts (``tokenize_prompt_answer``: the answer and its
    end-of-text), on ``examples`` the model never trained on. Unlike exact match it is not capped at
    100%: two models that both answer every date right can still differ in how sure they are.
    """
    import datasets

    rows = examples if isinstance(examples, datasets.Dataset) else datasets.Dataset.from_list(list(examples))
    data = tokenize_prompt_answer(rows.select_columns(["prompt", "answer"]), tokenizer)
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in collate([data[j] for j in range(i, min(i + batch_size, len(data)))]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
            total += nll.item()
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / count


def evaluate_task(model, tokenizer, examples, max_new_tokens: int = 12) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy answers on ``examples`` (dicts or a Dataset with prompt/answer)."""
    prompts = [e["prompt"] for e in examples]
    answers = [e["answer"] for e in examples]
    raw = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return exact_match(raw, answers), [clean_answer(r) for r in raw]
