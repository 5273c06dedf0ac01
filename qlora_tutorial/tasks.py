"""A small task that shows what fine-tuning changed: write an ISO date out in words.

    prompt  "Date: 2021-07-04\\nIn words:"      answer  "4 July 2021"

A falling training loss says the model fits its training batches; it does not say the model learned
anything useful. This task gives a measured effect instead: the answer is a deterministic function
of the input (day without a leading zero, the month's English name, the year), so exact-match
accuracy on dates the model never saw in training is a fair score. The base SmolLM2-135M-Instruct
gets it wrong; a few minutes of LoRA/QLoRA fine-tuning on a CPU teach it.

Everything here is generated from a seed with Python's ``random.Random``: the same seed gives the
same examples on every machine, and the train and test splits share no date.
"""
from __future__ import annotations

import datetime as dt
import random

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
PROMPT = "Date: {iso}\nIn words:"
FIRST_YEAR, LAST_YEAR = 1900, 2099


def date_in_words(date: dt.date) -> str:
    """The task's answer for one date: '4 July 2021' (day without leading zero, month name, year)."""
    return f"{date.day} {MONTHS[date.month - 1]} {date.year}"


def date_example(date: dt.date) -> dict:
    """One example: {"iso", "prompt", "answer"}; the model sees prompt and must continue with ' ' + answer."""
    iso = date.isoformat()
    return {"iso": iso, "prompt": PROMPT.format(iso=iso), "answer": date_in_words(date)}


def sample_dates(n: int, seed: int = 0, first_year: int = FIRST_YEAR, last_year: int = LAST_YEAR) -> list[dt.date]:
    """``n`` distinct dates drawn uniformly from ``first_year``-01-01 .. ``last_year``-12-31, in draw order."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not (1 <= first_year <= last_year <= 9999):
        raise ValueError(f"need 1 <= first_year <= last_year <= 9999, got {first_year}..{last_year}")
    lo, hi = dt.date(first_year, 1, 1).toordinal(), dt.date(last_year, 12, 31).toordinal()
    if n > hi - lo + 1:
        raise ValueError(f"asked for {n} distinct dates but {first_year}..{last_year} holds only {hi - lo + 1}")
    rng = random.Random(seed)
    return [dt.date.fromordinal(o) for o in rng.sample(range(lo, hi + 1), n)]


def date_task(n_train: int = 400, n_test: int = 50, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out test examples, with no date in both: (train, test) lists of dicts."""
    dates = sample_dates(n_train + n_test, seed=seed)
    examples = [date_example(d) for d in dates]
    return examples[:n_train], examples[n_train:]


def date_datasets(n_train: int = 400, n_test: int = 50, seed: int = 0):
    """``date_task`` as two ``datasets.Dataset`` objects with columns iso, prompt, answer."""
    import datasets

    train, test = date_task(n_train, n_test, seed)
    return datasets.Dataset.from_list(train), datasets.Dataset.from_list(test)


def clean_answer(text: str) -> str:
    """What counts as the model's answer: its first non-empty line, stripped.

    Generous to the base model: text it adds on later lines is ignored, so the score measures the
    transformation, not only whether the model knows when to stop.
    """
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(predictions, answers) -> float:
    """The share of predictions equal to their answer after ``clean_answer`` (0.0 .. 1.0)."""
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers; pass one prediction per answer")
    if not answers:
        raise ValueError("no answers to score")
    return sum(clean_answer(p) == a for p, a in zip(predictions, answers)) / len(answers)


CHAT_SYSTEM = "Write the date in words."  # the system turn of the chat-formatted task


def chat_prompts(dataset, tokenizer, system: str = CHAT_SYSTEM):
    """The task in an instruct model's own chat format: each prompt becomes a system turn, the
    prompt as the user's turn, and the opening of the assistant's turn (``apply_chat_template`` with
    ``add_generation_prompt=True``). The answer then follows the prompt directly: tokenise with
    ``tokenize_prompt_answer(..., separator="")``, and the end-of-text token the model learns is the
    end of the assistant's turn.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} has no chat template: use the plain prompts of this task "
                         "with a base (not instruct) model")

    def to_chat(row):
        turns = [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}]
        return {"prompt": tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)}

    return dataset.map(to_chat)
