"""AdaLoRA against LoRA at the same final rank budget on the date task (chapter 14).

    python -m qlora_tutorial.bench.adalora_study --json book/data/adalora_date_task.json

Three setups, three seeds each, on SmolLM2-135M-Instruct with every linear layer of every decoder
layer adapted on the 4-bit NF4 base with double quantization: LoRA at r = 8 with the date task's
recipe (learning rate 1e-3), LoRA at r = 8 with AdaLoRA's learning rate (1e-2), and AdaLoRA from
12 triplets per layer down to 8 per layer on average (the same final budget as LoRA's r = 8), at
1e-2: AdaLoRA's update is a product of three factors that start small, and at 1e-3 it barely moves
in 30 steps. Each run records its exact match on the held-out dates, its last training loss, and
for AdaLoRA the final rank pattern. Runs on any device; the book's file was made on a CPU.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

SEEDS = (0, 1, 2)
N_TRAIN, N_TEST = 400, 50
SETUPS = {
    "lora": dict(kind="lora", lr=1e-3),
    "lora-lr1e-2": dict(kind="lora", lr=1e-2),
    "adalora": dict(kind="adalora", lr=1e-2),
}
LORA = dict(r=8, alpha=16)
ADALORA = dict(init_r=12, target_r=8, alpha=24, tinit=5, tfinal=5, deltaT=2)  # alpha / init_r = LoRA's alpha / r


def run_one(name: str, seed: int) -> dict:
    """Train one setup with one seed on the date task; its scores (and AdaLoRA's rank pattern)."""
    from .. import adalora
    from ..device import pick_device, seed_everything
    from ..models import load_model, load_tokenizer
    from ..quantize import quantize_model
    from ..tasks import date_datasets
    from ..train import DATE_TASK_RECIPE, evaluate_task, make_trainer, tokenize_prompt_answer, train, training_arguments

    setup = SETUPS[name]
    runtime = pick_device()
    seed_everything(seed)
    tokenizer = load_tokenizer()
    train_set, test_set = date_datasets(n_train=N_TRAIN, n_test=N_TEST, seed=0)
    model = load_model(dtype=runtime.dtype, device=runtime.device)
    recipe = dict(DATE_TASK_RECIPE, learning_rate=setup["lr"])
    if setup["kind"] == "lora":
        quantize_model(model, "all", alpha=LORA["alpha"], r=LORA["r"], double_quant=True)
    else:
        adalora.adalora_model(model, "all", total_step=recipe["max_steps"], use_qlora=True, double_quant=True,
                              **ADALORA)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, runtime, seed=seed, **recipe)
        trainer = make_trainer(model, args, tokenize_prompt_answer(train_set, tokenizer), tokenizer.pad_token_id)
        if setup["kind"] == "adalora":
            trainer.add_callback(adalora.AdaLoraCallback())
        result = train(trainer)
    accuracy, _ = evaluate_task(model, tokenizer, test_set)
    row = {"setup": name, "seed": seed, "lr": setup["lr"], "exact_match": accuracy,
           "final_train_loss": result["losses"][-1][1], "train_seconds": round(result["seconds"], 1)}
    if setup["kind"] == "adalora":
        row["rank_pattern"] = {layer: [int(k) for k in kept] for layer, kept in adalora.rank_pattern(model).items()}
    return row


def main(argv=None) -> int:
    import torch

    from .results import provenance, shown_command, write_json

    parser = argparse.ArgumentParser(prog="python -m qlora_tutorial.bench.adalora_study", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("book") / "data" / "adalora_date_task.json")
    args = parser.parse_args(argv)
    command = shown_command("python -m qlora_tutorial.bench.adalora_study " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    from ..device import pick_device

    runtime = pick_device()
    result = {"provenance": {**provenance(runtime.device, command), "dtype": str(runtime.dtype).replace("torch.", ""),
                             "threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct (offline)",
                             "targets": "all", "base": "nf4, double quantization", "n_train": N_TRAIN,
                             "n_test": N_TEST, "seeds": list(SEEDS), "lora": LORA, "adalora": ADALORA,
                             "setups": SETUPS},
              "runs": []}
    start = time.perf_counter()
    for seed in SEEDS:
        for name in SETUPS:
            row = run_one(name, seed)
            result["runs"].append(row)
            print(f"[{time.perf_counter() - start:6.0f} s] {name:12s} seed {seed}: exact match {row['exact_match']:.0%}, "
                  f"final loss {row['final_train_loss']:.3f}", flush=True)
            write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
